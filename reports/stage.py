"""`quantgate gate` and `quantgate report`: verdict.json + JUnit XML, and the self-contained report.html."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

from qgcore.errors import EXIT_GATE_REJECTED, EXIT_OK, ConfigError
from reports.data import build_report_data, build_verdict, load_run
from reports.policy import load_policy
from reports.render import render


def junit_xml(verdict: dict) -> str:
    """One test case per variant x check; 'inconclusive' is reported as skipped, 'fail' as failure."""
    suite = ET.Element("testsuite", name="quantgate.gate")
    tests = failures = skipped = 0
    for variant, dec in verdict["variants"].items():
        for check in dec["checks"]:
            tests += 1
            case = ET.SubElement(suite, "testcase", classname=f"quantgate.{variant}", name=check["name"])
            if check["outcome"] == "fail":
                failures += 1
                ET.SubElement(case, "failure", message=check["reason"]).text = check["reason"]
            elif check["outcome"] in ("inconclusive", "skipped"):
                skipped += 1
                ET.SubElement(case, "skipped", message=f"{check['outcome']}: {check['reason']}")
            ET.SubElement(case, "system-out").text = json.dumps(check["numbers"])
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("skipped", str(skipped))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


def run_gate(run_dir: Path, *, policy_path: Path | None, require: str | None, junit: Path | None,
             verify: bool = False) -> int:
    policy = load_policy(policy_path)
    verdict = build_verdict(run_dir, policy, load_run(run_dir, verify=verify))
    if require is not None and require not in verdict["variants"]:
        raise ConfigError(f"--require {require}: no such variant in {run_dir} "
                          f"(have: {', '.join(verdict['variants'])})")
    (run_dir / "verdict.json").write_text(json.dumps(verdict, indent=1) + "\n")
    (junit or run_dir / "verdict.junit.xml").write_text(junit_xml(verdict))
    for name, dec in verdict["variants"].items():
        print(f"{name:>8}: {dec['verdict'].upper()}")
        for c in dec["checks"]:
            print(f"          {c['outcome']:<12} {c['reason']}")
    mult = verdict["multiplicity"]
    print(f"intervals: {mult['level']:.2%} two-sided ({mult['correction']} over {mult['k']} variants, "
          f"alpha {mult['alpha']}); Tango score for accuracy, BCa bootstrap for bits/byte")
    rec = verdict["recommended"]
    print(f"recommended: {rec or 'none'}" + (f"\ndeploy: {verdict['deploy']['command']}" if rec else ""))
    print(f"wrote {run_dir / 'verdict.json'}", file=sys.stderr)
    if require is not None:
        return EXIT_OK if verdict["variants"][require]["verdict"] == "promote" else EXIT_GATE_REJECTED
    return EXIT_OK if verdict["passed"] else EXIT_GATE_REJECTED


def run_report(run_dir: Path, *, policy_path: Path | None, verify: bool = False) -> int:
    data = build_report_data(run_dir, load_policy(policy_path), verify=verify)
    out = run_dir / "report.html"
    out.write_text(render(data))
    print(f"wrote {out}")
    return EXIT_OK
