"""Which teacher filters pay: a teacher's readings of unlabelled images whose truth is known, kept by each set of
filters, with how many are right.

    python tools/fewlabels.py ../shared/realsets/tjsp5 /tmp/zero/tjsp5 --labelled 50
    python tools/teacher_filters.py /tmp/zero/tjsp5/unlabeled /tmp/zero/tjsp5/unlabeled_truth.csv \\
        --teacher ddddocr --check /tmp/zero/tjsp5/labelled_50

The teacher reads each image once (its readings are cached in --cache); each row of the table applies teacher.py's
filters (teacher.filter_readings) with some of them left out. "check" rows take the lengths, symbols, letter case
and confidence threshold from the check folder's labels, as train.py --teacher ... --check does.
"""

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit's modules, one folder up

import cli
import dataset
import imagefiles
import teacher as teachers
from errors import CaptchaError


def read_cached(source, paths, cache):
    """The teacher's readings of `paths`, read once and kept in the CSV `cache`."""
    if cache.exists():
        with open(cache, newline="") as f:
            rows = {row["path"]: row for row in csv.DictReader(f)}
        if all(str(p) in rows for p in paths):
            return [teachers.TeacherReading(str(p), rows[str(p)]["text"], rows[str(p)]["second"] or None,
                                            float(rows[str(p)]["confidence"]) if rows[str(p)]["confidence"] else None)
                    for p in paths]
    readings = list(source().read_paths(paths))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text", "second", "confidence"])
        writer.writerows([r.path, r.text, r.second or "", "" if r.confidence is None else r.confidence]
                         for r in readings)
    return readings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("unlabeled", help="a folder of images")
    parser.add_argument("truth", help="their labels: a CSV of file,label (tools/fewlabels.py writes one)")
    parser.add_argument("--teacher", default="ddddocr", help="ddddocr or a model file")
    parser.add_argument("--check", help="a folder of labelled images (labels in the names)")
    parser.add_argument("--cache", default="", help="where the readings are kept (default: beside the truth file)")
    args = parser.parse_args(argv)
    try:
        paths = imagefiles.list_images(args.unlabeled)
        with open(args.truth, newline="") as f:
            truth = {row["file"]: row["label"] for row in csv.DictReader(f)}
        cache = Path(args.cache or Path(args.truth).with_name(f"teacher_{Path(args.teacher).stem}.csv"))
        readings = read_cached(lambda: teachers.load_teacher(args.teacher), paths, cache)
        check = None
        if args.check:
            found = dataset.scan_folder(Path(args.check), case="auto", verify=False)
            check_readings = read_cached(lambda: teachers.load_teacher(args.teacher),
                                         [path for path, _ in found.samples], cache.with_name(cache.stem + "_check.csv"))
            check = found, check_readings
    except (CaptchaError, OSError, KeyError) as e:
        return cli.user_error(e)

    def right(kept, case):
        return sum(teachers.fold(truth[Path(path).name], case) == label for path, label in kept)

    one_reader = [dataclasses.replace(r, second=None) for r in readings]
    rows = [("case folded (lower) only", teachers.filter_readings(one_reader, "lower", lengths=set(range(1, 99)),
                                                                  symbols=set("".join(r.text.lower() for r in readings)))),
            ("typical length and symbols", teachers.filter_readings(one_reader, "lower"))]
    if any(r.second is not None for r in readings):
        rows.append(("typical length and symbols, both readers agree", teachers.filter_readings(readings, "lower")))
    if check:
        found, check_readings = check
        labels = [label for _, label in found.samples]
        case, lengths, symbols = found.case, {len(s) for s in labels}, set("".join(labels))
        check_truth = {str(path): label for path, label in found.samples}
        for name, source, check_source in [("check's lengths and symbols", one_reader,
                                            [dataclasses.replace(r, second=None) for r in check_readings]),
                                           ("check's lengths and symbols, both readers agree", readings, check_readings)]:
            if name.endswith("agree") and not any(r.second is not None for r in readings):
                continue
            rows.append((name, teachers.filter_readings(source, case, lengths, symbols)))
            threshold, measured = teachers.check_threshold(check_source, check_truth, case, lengths, symbols)
            if threshold is not None:
                rows.append((name + f", confidence >= {threshold:.4g} (check)",
                             teachers.filter_readings(source, case, lengths, symbols, threshold)))
            print(f"{name}: {measured}")
    print(f"\n{args.teacher} on {len(paths)} images of {args.unlabeled}\n")
    print("| filters | kept | right | share right |")
    print("| --- | --- | --- | --- |")
    for name, filtered in rows:
        n_right = right(filtered.kept, filtered.case)
        share = f"{n_right / len(filtered.kept):.3f}" if filtered.kept else "-"
        print(f"| {name} | {len(filtered.kept)} | {n_right} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
