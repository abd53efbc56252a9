"""Runs grove_torch's pytest suite for CTest: `python3 run_pytest.py TESTS_DIR [pytest args]`.

pytest exits 5 when it collects no test; that is a failure here, not a pass (a renamed file or a
broken import must not turn the suite green)."""

import sys

import pytest

code = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]])
if code == pytest.ExitCode.NO_TESTS_COLLECTED:
    print("grove_torch: pytest collected no tests; failing", file=sys.stderr)
    sys.exit(1)
sys.exit(int(code))
