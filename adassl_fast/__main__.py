from adassl_fast.apps.cli import main

raise SystemExit(main())
