import sys
from pathlib import Path

# eval/ is not an installed package; make `import eval.goodput` work from any rootdir.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
