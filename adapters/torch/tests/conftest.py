import pathlib
import sys

# The reference block lives beside the tests.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
