"""The runner the end-to-end scripts share: every `check_*` function of a module, each
reported as `ok`/`FAIL` with its traceback, then `N passed, N failed`; the exit status says
whether all passed."""

import sys
import traceback


def run(namespace):
    checks = [v for k, v in namespace.items() if k.startswith("check_") and callable(v)]
    failed = 0
    for check in checks:
        try:
            check()
            print(f"ok   {check.__name__}")
        except Exception:  # report every failure, not only the first
            failed += 1
            print(f"FAIL {check.__name__}")
            traceback.print_exc()
    print(f"{len(checks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
