"""Where CI's time goes, from pytest's JUnit XML: worker time per test file and the slowest tests.

  python tools/ci_times.py .ci/results/main.xml [more.xml ...] [--top=30]

Worker time is the sum of the tests' own times (setup, call and teardown, as pytest records
them); with two workers the wall time is at least half of it. BUILD.md's budget rule is stated
in these per-file numbers.
"""

from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ElementTree


def read_cases(path: str) -> list[tuple[str, str, float, str]]:
  """(file, test name, seconds, outcome) of every test case in one JUnit XML file."""
  cases = []
  for case in ElementTree.parse(path).getroot().iter("testcase"):
    module = case.get("classname", "").split(".")
    # classname is "tests.test_x" or "tests.test_x.TestClass": the file is the test_* part.
    file = next((f"{part}.py" for part in module if part.startswith("test_")), ".".join(module))
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
      if case.find(tag) is not None:
        outcome = tag
    cases.append((file, case.get("name", ""), float(case.get("time", 0.0)), outcome))
  return cases


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("xml", nargs="+")
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args()
  for path in args.xml:
    cases = read_cases(path)
    per_file = collections.Counter()
    outcomes = collections.Counter(outcome for *_, outcome in cases)
    for file, _, seconds, _ in cases:
      per_file[file] += seconds
    total = sum(per_file.values())
    print(f"{path}: {len(cases)} tests ({dict(outcomes)}), {total / 60:.1f} worker-minutes")
    print(f"  worker seconds per file (the {args.top} largest):")
    for file, seconds in per_file.most_common(args.top):
      print(f"  {seconds:8.1f}  {100 * seconds / total:5.1f}%  {file}")
    print(f"  the {args.top} slowest tests:")
    for file, name, seconds, _ in sorted(cases, key=lambda c: -c[2])[:args.top]:
      print(f"  {seconds:8.1f}  {file}::{name}")


if __name__ == "__main__":
  main()
