from adassl_fast.cli import main

raise SystemExit(main())
