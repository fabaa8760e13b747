"""`quantgate gate` and `quantgate report`: verdict.json + JUnit XML, and the self-contained report.html."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

from qgcore.errors import EXIT_GATE_REJECTED, EXIT_OK, ConfigError
from reports.data import build_report_data, build_verdict
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
    verdict = build_verdict(run_dir, policy, verify=verify)
    if require is not None and require not in verdict["variants"]:
        raise ConfigError(f"--require {require}: no such variant in {run_dir} "
                          f"(have: {', '.join(verdict['variants'])})")
    tmp = run_dir / "verdict.json.tmp"
    tmp.write_text(json.dumps(verdict, indent=1) + "\n")
    tmp.replace(run_dir / "verdict.json")
    (junit or run_dir / "verdict.junit.xml").write_text(junit_xml(verdict))
    fam = verdict["family"]
    for name, dec in verdict["variants"].items():
        print(f"{name:>8}: {dec['verdict'].upper()}  (tested at one-sided {dec['level']:.4g}, quality p "
              f"{dec['p_value']:.3g})")
        for c in dec["checks"]:
            print(f"          {c['outcome']:<12} {c['reason']}")
    print(f"family-wise: alpha {fam['alpha']} ({fam['correction']} over the {fam['k']} declared variants"
          f"{'; absent: ' + ', '.join(fam['absent']) if fam['absent'] else ''}); Tango score for accuracy, BCa "
          "bootstrap for bits/byte")
    rec = verdict["recommended"]
    print(f"recommended: {rec or 'none'}" + (f"\ndeploy: {verdict['deploy']['command']}" if rec else ""))
    print(f"wrote {run_dir / 'verdict.json'}", file=sys.stderr)
    if require is not None:
        return EXIT_OK if verdict["variants"][require]["verdict"] == "promote" else EXIT_GATE_REJECTED
    return EXIT_OK if verdict["passed"] else EXIT_GATE_REJECTED


def run_report(run_dir: Path) -> int:
    data = build_report_data(run_dir)
    out = run_dir / "report.html"
    out.write_text(render(data))
    print(f"wrote {out}")
    return EXIT_OK


def run_deploy(run_dir: Path, *, every: bool = False) -> int:
    """Deploy kits from verdict.json (promoted variants; every served one with `every`), validated."""
    from reports.data import deploy_line, load_run, read_verdict
    from reports.deploy import write_kits

    verdict, _ = read_verdict(run_dir)
    record, run = load_run(run_dir)
    names = [n for n in verdict["variants"] if verdict["variants"][n]["verdict"] == "promote" or every]
    lines = {n: deploy_line(run_dir, record, n, run[n]) for n in names}
    kits = write_kits(run_dir, verdict, every, lines, {n: run[n]["bench"] or {} for n in run}, record.serving)
    for name in kits:
        print(f"deploy kit: {run_dir / 'deploy' / name} (validated: kubernetes-validate, KEDA fields, promtool)")
    if not kits:
        print("deploy: no promoted variant: no kit written (`quantgate deploy --all` writes one per served variant)")
    return EXIT_OK
