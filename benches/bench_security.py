"""make bench-security: the security issue's figures in one run.

Runs, one after another on this machine: bench_authz.py (one authorisation
decision with a city-sized policy), bench_interceptor.py (a trivial RPC with
and without the interceptor) and bench_audit.py (audit chain append and
verify). Each prints its own figures; the last line here is one JSON object
with the keys the issue names plus the supporting ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True,
                         check=True)
    sys.stdout.write(out.stdout)
    figures: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    authz = run("bench_authz.py")
    interceptor = run("bench_interceptor.py")
    audit = run("bench_audit.py")
    result = {
        "authz_p99_us": authz["authz_p99_us"],
        "authz_cached_p99_us": authz["authz_cached_p99_us"],
        "casbin_hierarchical_p99_us": authz["casbin_hierarchical_p99_us"],
        "interceptor_overhead_p50_ms": interceptor["interceptor_overhead_p50_ms"],
        "interceptor_overhead_p99_ms": interceptor["interceptor_overhead_p99_ms"],
        "audit_append_per_s": audit["audit_append_per_s"],
        "audit_append_call_us": audit["audit_append_call_us"],
        "audit_verify_records_per_s": audit["audit_verify_records_per_s"],
        "users": authz["users"], "tenants": authz["tenants"],
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
