cd "$(dirname "$0")/../../.."
for i in 1 2 3; do for impl in torch reference; do
  .venv/bin/python -c "
import sys; sys.argv=['x','$impl','16384','128']
exec(open('tests/test_memory.py').read().split('PROBE = r\"\"\"')[1].split('\"\"\"')[0])
" | sed "s/^/$impl /"
done; done
