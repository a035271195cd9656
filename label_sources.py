"""Where a folder's labels come from: its file names (by a rule) or a labels file beside the images.

    labels.find_labels("captchas/")                        # auto: the naming rule decided from all the names
    labels.find_labels("captchas/", labels_from="prefix")  # 002p_56dc268e....jpg -> 002p
    labels.find_labels("numbered/", labels_file="labels.csv")

One place for train.py, `dataset.py scan`, test.py's scoring and bench.py, so that a folder is read
the same way by all of them. File-name rules (on the name without its extension):

    name     the whole name: 4721.png -> 4721; a duplicate 4721_1.png / 4721-1.png -> 4721
    prefix   before the first "_": 4721_56dc268efdae9066.png -> 4721 (dddd_trainer, captcha_trainer)
    suffix   after the last "_": 000123_4721.png -> 4721
    regex:P  P matched against the whole name: its group "label", or else its first group
    auto     one of name, prefix, suffix, chosen from all the folder's names; refused when it cannot
             tell, or when the labels it would read look like ids or hashes (then no rule is guessed)

A labels file (`labels_file`): CSV or tab-separated `file,label` rows (a header row is recognised and
skipped), a JSON object or a Python dict `{"12.jpg": "3952"}`, or one label per line, in numeric file
order: each image's name is a number, and line n labels `n.png` (line 1 labels 0.png instead when there
is an image numbered 0). Keys are matched to images by path relative to the folder, then by file name,
then by name without extension.

Labels with one space between symbols, as CnOCR and PaddleOCR label files write them
(`624.jpg<TAB>降 飞 淀 惶`), are joined (`降飞淀惶`) and the decision printed: `spaces` "auto" joins when every
label is written that way, keeps labels without spaces as they are, and refuses a mix it cannot tell;
"join" removes every space, "keep" keeps a space as a symbol of its own.

Images without a label, entries whose image is missing, entries listed twice: all are skipped and
counted by reason with the scan's other skips, never guessed at.
"""

import ast
import csv
import dataclasses
import hashlib
import io
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from errors import CaptchaError
from imagefiles import list_images
from charsets import colour_name

RULES = ("auto", "name", "prefix", "suffix")  # and "regex:PATTERN"
SPACES = ("auto", "join", "keep")  # --label_spaces
SPACED = re.compile(r"\S( \S)*")  # one symbol, or symbols each separated by one space
ODD_SHARE = 0.05  # labels written unlike the rest (spaces), up to this share, are skipped as odd ones out
DUPLICATE_SUFFIX = re.compile(r"[_-]\d{1,3}$")  # 4721_1 and 4721-12 are more images of 4721
SEPARATOR = "_"
HEX = re.compile(r"[0-9a-fA-F]+")
LONG_LABEL = 10  # auto: labels this long and nearly all distinct are ids, not captcha texts
COLOUR_COLUMNS = ("colour", "color")  # a labels file's column of the colour each image asks for
HEADER_WORDS = {"file", "filename", "file_name", "image", "img", "path", "name", "fname", "id", "label", "labels",
                "text", "captcha", "answer", "code", "value", "solution"}


@dataclass(frozen=True)
class LabelSource:
    """How a folder's labels were read: a file-name rule, or a labels file (with its content's hash).
    Stored in every model a run writes, so a resume and test.py read the folder the same way."""

    rule: str  # name, prefix, suffix, regex:PATTERN, or file
    labels_file: str = ""
    sha256: str = ""
    spaces: str = "keep"  # join or keep (what "auto" decided): spaces between symbols removed, or kept as symbols

    def to_dict(self):
        return {"rule": self.rule, "labels_file": self.labels_file, "sha256": self.sha256, "spaces": self.spaces}

    @classmethod
    def from_dict(cls, d):
        return cls(d.get("rule", "name"), d.get("labels_file", ""), d.get("sha256", ""), d.get("spaces", "keep"))

    def describe(self):
        return f"labels file {self.labels_file}" if self.rule == "file" else f"file names, rule {self.rule!r}"

    @classmethod
    def given(cls, labels_from="auto", labels_file=None, spaces="auto"):
        """What the flags ask for (--labels_from, --labels, --label_spaces), before a folder decides "auto"."""
        if labels_file:
            return cls("file", str(labels_file), spaces=spaces or "auto")
        return cls(labels_from or "auto", spaces=spaces or "auto")


@dataclass
class LabelledFolder:
    """What find_labels found: (path, label) pairs, the skips by reason and the source that read them."""

    samples: list
    skipped: dict = field(default_factory=dict)  # reason -> [paths or entries]
    source: LabelSource = LabelSource("name")
    decision: str = ""  # what auto decided and why, with examples (printed by the scripts)
    asked: dict = field(default_factory=dict)  # path -> the colour its captcha asks for (a labels file's colour
    #                                            column), for every listed image that has one, labelled or not


# ----------------------------------------------------------------------------- file-name rules


REJECTED_READINGS_NAME = "readings.csv"  # serve.py --collect: the readings the site rejected, file,text


def rejected_readings(folder):
    """{file name: a reading the site rejected} from FOLDER/readings.csv (serve.py --collect's rejected/), or {}."""
    path = Path(folder) / REJECTED_READINGS_NAME
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row[0]: row[1] for row in csv.reader(f) if len(row) == 2 and row[1]}


def label_from_name(stem, rule):
    """The label a file name (without extension) gives under `rule`, or None if the rule finds none."""
    if rule == "name":
        return DUPLICATE_SUFFIX.sub("", stem)
    if rule == "prefix":
        return stem.split(SEPARATOR, 1)[0] if SEPARATOR in stem else None
    if rule == "suffix":
        return stem.rsplit(SEPARATOR, 1)[1] if SEPARATOR in stem else None
    if rule.startswith("regex:"):
        match = compile_rule(rule).fullmatch(stem)
        if match is None:
            return None
        return match.group("label") if "label" in match.re.groupindex else match.group(1)
    raise CaptchaError(f"unknown --labels_from {rule!r}; choose from {', '.join(RULES)} or regex:PATTERN")


def label_from_filename(path, rule="name"):
    """The label of one file's name under `rule` (None if the rule finds none)."""
    return label_from_name(Path(path).stem, rule)


def compile_rule(rule):
    try:
        pattern = re.compile(rule[len("regex:"):])
    except re.error as e:
        raise CaptchaError(f"--labels_from {rule!r}: not a valid regular expression ({e})") from None
    if pattern.groups == 0:
        raise CaptchaError(f"--labels_from {rule!r}: needs a group that captures the label, e.g. "
                           f"regex:captcha-(?P<label>\\w+)")
    return pattern


def check_rule(rule):
    if rule in RULES:
        return rule
    if rule.startswith("regex:"):
        compile_rule(rule)
        return rule
    raise CaptchaError(f"unknown --labels_from {rule!r}; choose from {', '.join(RULES)} or regex:PATTERN")


def id_like(labels):
    """Why these labels look like ids or hashes rather than captcha texts, or None if they don't."""
    if not labels:
        return None
    distinct = len(set(labels)) / len(labels)
    median_length = statistics.median(len(label) for label in labels)
    if median_length >= 16 and all(HEX.fullmatch(label) for label in labels):
        return f"hex strings of {median_length:g} characters (hashes)"
    if median_length >= LONG_LABEL and distinct > 0.95:
        return f"nearly all distinct and {median_length:g} characters long (ids)"
    if len(labels) >= 10 and all(label.isdigit() for label in labels) and distinct == 1.0:
        numbers = sorted(int(label) for label in labels)
        if numbers[-1] - numbers[0] + 1 <= 1.2 * len(numbers):
            return f"consecutive numbers {numbers[0]}-{numbers[-1]} (a file numbering)"
    if len(labels) >= 10 and max(labels.count(x) for x in set(labels[:20])) > len(labels) / 2:
        common = max(set(labels), key=labels.count)
        return f"more than half of them the same text {common!r}"
    return None


def _plain_name_problem(stems, labels):
    """Why the name rule does not fit a folder whose names hold separators, or None."""
    if any(SEPARATOR in label for label in labels):
        kept = next(label for label in labels if SEPARATOR in label)
        return f"its labels would keep the '{SEPARATOR}' that separates fields ({kept!r})"
    return id_like(labels)


def decide_rule(stems):
    """auto: the one file-name rule that reads these names as captcha texts, or CaptchaError. Returns
    (rule, why)."""
    with_separator = sum(SEPARATOR in stem for stem in stems)
    candidates, rejected = {}, []
    for rule in ("name", "prefix", "suffix"):
        labels = [label_from_name(stem, rule) for stem in stems]
        found = [label for label in labels if label]
        if len(found) < 0.95 * len(stems):
            rejected.append(f"{rule}: only {len(found)} of {len(stems)} names have a label")
            continue
        problem = _plain_name_problem(stems, found) if rule == "name" and with_separator else id_like(found)
        if problem:
            rejected.append(f"{rule}: {problem}")
        else:
            candidates[rule] = tuple(labels)
    # rules that read every name alike are one choice (prefix and name agree on 4721_1.png)
    distinct = {}
    for rule, labels in candidates.items():
        distinct.setdefault(labels, rule)
    if len(distinct) == 1:
        rule = next(iter(distinct.values()))
        return rule, "; ".join(rejected) if with_separator else ""
    if set(distinct.values()) == {"prefix", "suffix"}:  # ID_LABEL or LABEL_ID with a short id: the far longer
        lengths = {rule: statistics.median(len(label) for label in candidates[rule] if label)  # side is the id
                   for rule in ("prefix", "suffix")}
        short, long = sorted(lengths, key=lengths.get)
        if lengths[long] >= 1.5 * lengths[short] and lengths[long] >= lengths[short] + 2:
            rejected.append(f"{long}: {lengths[long]:g} characters against {lengths[short]:g} (the id)")
            return short, "; ".join(rejected)
    flag_hint = "pass --labels_from name|prefix|suffix|regex:PATTERN, or --labels FILE"
    if not distinct:
        raise CaptchaError(f"the file names do not look like labels ({'; '.join(rejected)}); {flag_hint}")
    rules = sorted(distinct.values())
    examples = ", ".join(f"{rule} reads {stems[0]!r} as {candidates[rule][0]!r}" for rule in rules)
    raise CaptchaError(f"cannot tell which part of the file names is the label ({examples}); {flag_hint}")


def _skip(skipped, reason, item):
    skipped.setdefault(reason, []).append(str(item))


def _from_names(folder, paths, rule):
    skipped, samples = {}, []
    decision = ""
    if rule == "auto":
        stems = [path.stem for path in paths]
        rule, why = decide_rule(stems) if stems else ("name", "")
        examples = ", ".join(f"{p.name} -> {label_from_name(p.stem, rule)!r}" for p in paths[:2])
        decision = (f"labels: file names, rule {rule!r} (auto, from all {len(paths)} names: {examples})"
                    + (f"; not {why}" if why else ""))
    for path in paths:
        label = label_from_name(path.stem, rule)
        if label is None:
            _skip(skipped, f"no label in the file name (rule {rule})", path)
        elif not label:
            _skip(skipped, "empty label", path)
        else:
            samples.append((str(path), label))
    return LabelledFolder(samples, skipped, LabelSource(rule), decision)


# ----------------------------------------------------------------------------- labels files


def _entries_from_text(text, path):
    """A labels file's text -> ([(key, label, the row's further columns)], kind); key None: one label per line, in
    numeric order."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            table = json.loads(stripped)
            kind = "JSON object"
        except ValueError:
            try:
                table = ast.literal_eval(stripped)  # a Python dict's text: literals only, no code runs
                kind = "Python dict"
            except (ValueError, SyntaxError) as e:
                raise CaptchaError(f"{path}: neither a JSON object nor a Python dict ({type(e).__name__})") from None
        if not isinstance(table, dict):
            raise CaptchaError(f"{path}: not an object of file -> label")
        return [(str(k), "" if v is None else str(v), ()) for k, v in table.items()], kind
    lines = [line for line in stripped.splitlines() if line.strip()]
    if not lines:
        raise CaptchaError(f"{path}: the labels file is empty")
    delimiter = "\t" if all("\t" in line for line in lines[:50]) else "," if all("," in line for line in lines[:50]) \
        else None
    if delimiter is None:
        if any("\t" in line or "," in line for line in lines[:50]):
            raise CaptchaError(f"{path}: some lines have a separator (tab or comma) and some do not; expected "
                               f"file,label rows or one label per line")
        return [(None, line.strip(), ()) for line in lines], "one label per line"
    rows = [row for row in csv.reader(io.StringIO(stripped), delimiter=delimiter) if row]
    bad = next((i for i, row in enumerate(rows) if len(row) < 2), None)
    if bad is not None:
        raise CaptchaError(f"{path}: line {bad + 1} has no label ({delimiter!r}-separated file,label expected)")
    kind = "tab-separated" if delimiter == "\t" else "CSV"
    return [(row[0].strip(), row[1].strip(), tuple(cell.strip() for cell in row[2:])) for row in rows], kind


def _is_header(key, label, lookup):
    return lookup(key) is None and (key.strip().lower() in HEADER_WORDS or label.strip().lower() in HEADER_WORDS)


def _colour_column(header, rows):
    """(the index among a row's extra columns of the asked colour, a note on extra columns not read). The colour
    is read from a column headed `colour` or `color` only: a third column is not guessed at."""
    extra = header[2] if header else ()
    names = [name.strip().lower() for name in extra]
    for name in COLOUR_COLUMNS:
        if name in names:
            return names.index(name), ""
    if extra:
        return None, f"; column {extra[0]!r} not read (a column headed colour is read as the colour asked for)"
    if any(rest for _, _, rest in rows):
        return None, "; its third column not read (a header row file,label,colour reads it as the colour asked for)"
    return None, ""


def _image_number(path):
    return int(path.stem) if path.stem.isdigit() else None


def _from_file(folder, paths, labels_file):
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise CaptchaError(f"{labels_file}: labels file does not exist")
    raw = labels_file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CaptchaError(f"{labels_file}: not UTF-8 text") from None
    entries, kind = _entries_from_text(text, labels_file)
    source = LabelSource("file", str(labels_file), hashlib.sha256(raw).hexdigest())
    skipped = {}
    by_key = {}  # relative path, name and stem -> path (a name or stem that two images share matches neither)
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        for key in {relative, path.name, path.stem}:
            by_key[key] = path if key not in by_key or key == relative else None

    def lookup(key):
        return by_key.get(key.replace("\\", "/").removeprefix("./"))

    assigned = {}  # path -> label
    asked = {}  # path -> the asked colour
    if entries[0][0] is None:  # one label per line: line n labels n.png (0.png is line 1 if it exists)
        numbered = {}
        for path in paths:
            number = _image_number(path)
            if number is None:
                _skip(skipped, "no label (name is not a number, labels file has one label per line)", path)
            elif number in numbered:
                _skip(skipped, f"number {number} used by two images", path)
                _skip(skipped, f"number {number} used by two images", numbered.pop(number))
            else:
                numbered[number] = path
        first = 0 if 0 in numbered else 1
        for line, (_, label, _) in enumerate(entries):
            path = numbered.pop(first + line, None)
            if path is None:
                _skip(skipped, "listed but missing on disk", f"line {line + 1} ({label!r}): no image {first + line}")
            else:
                assigned[path] = label
        for path in numbered.values():
            _skip(skipped, "no label in the labels file", path)
        order = f"; line 1 labels image number {first}"
    else:
        header = entries[0] if _is_header(*entries[0][:2], lookup) else None
        entries = entries[1:] if header else entries
        colour_at, order = _colour_column(header, entries)
        seen = {}
        for key, label, rest in entries:
            path = lookup(key)
            if path is not None and colour_at is not None and colour_at < len(rest) and rest[colour_at]:
                asked[str(path)] = colour_name(rest[colour_at])
            if path is None:
                _skip(skipped, "listed but missing on disk", key)
            elif path in seen:
                _skip(skipped, "listed twice", key)
                if seen[path] != label:
                    assigned.pop(path, None)
            else:
                seen[path] = label
                assigned[path] = label
        conflicting = [path for path in seen if path not in assigned]
        for path in conflicting:
            _skip(skipped, "listed twice with different labels", path)
        for path in paths:
            if path not in seen:
                _skip(skipped, "no label in the labels file", path)
    samples = []
    for path in paths:
        if path in assigned:
            if not assigned[path]:
                _skip(skipped, "empty label", path)
            elif asked and str(path) not in asked:
                _skip(skipped, "no colour in the colour column", path)
            else:
                samples.append((str(path), assigned[path]))
    examples = ", ".join(f"{Path(p).name} -> {label!r}" for p, label in samples[:2])
    if asked:
        colours = sorted(set(asked.values()))
        order += f"; the colour asked for from its colour column: {len(colours)} colours ({', '.join(colours)})"
    decision = f"labels: {labels_file} ({kind}, {len(entries)} entries{order}; e.g. {examples})"
    return LabelledFolder(samples, skipped, source, decision, asked)


# ----------------------------------------------------------------------------- spaces between symbols


def decide_spaces(labels, spaces="auto"):
    """(join or keep, why, {odd label: why skipped}): what a space between symbols means. Under auto, a few labels
    (at most ODD_SHARE of them) that are not written as the rest are odd ones out, skipped by reason like any
    unusable file: a label with a space where the others have none (`bad name!.png` in a folder of names), or one
    without one symbol between single spaces where the others have (a CnOCR file). A real mix is refused
    (CaptchaError), since either reading would train some labels wrongly."""
    if spaces not in SPACES:
        raise CaptchaError(f"unknown --label_spaces {spaces!r}; choose from {', '.join(SPACES)}")
    with_space = [label for label in labels if " " in label]
    if spaces != "auto" or not with_space:
        return (spaces if spaces != "auto" else "keep"), "", {}
    few = ODD_SHARE * len(labels)
    if len(with_space) <= few:
        reason = f"a space in the label, where {len(labels) - len(with_space)} of {len(labels)} have none"
        return "keep", (f"{len(with_space)} of {len(labels)} labels hold a space and the others none: skipped as odd "
                        f"ones out (e.g. {with_space[0]!r}; --label_spaces keep trains them, a space as a symbol)"), \
            {label: reason for label in with_space}
    odd = [label for label in labels if not SPACED.fullmatch(label)]
    if len(odd) > few:
        raise CaptchaError(f"{len(with_space)} labels hold spaces, but {len(odd)} are not one symbol between single "
                           f"spaces (e.g. {odd[0]!r} beside {with_space[0]!r}): pass --label_spaces join (remove "
                           f"every space) or keep (a space is a symbol)")
    why = (f"one space between symbols in {len(with_space)} of {len(labels)} labels (the CnOCR/PaddleOCR form): "
           f"joined, {with_space[0]!r} -> {join_symbols(with_space[0])!r} (--label_spaces keep keeps them as symbols)")
    if odd:
        why += f"; {len(odd)} not written so skipped as odd ones out (e.g. {odd[0]!r})"
    reason = f"not one symbol between single spaces, where {len(labels) - len(odd)} of {len(labels)} are"
    return "join", why, {label: reason for label in odd}


def join_symbols(label):
    return "".join(label.split(" "))


def _apply_spaces(found, spaces):
    mode, why, odd = decide_spaces([label for _, label in found.samples], spaces)
    for path, label in found.samples:
        if label in odd:
            _skip(found.skipped, odd[label], path)
    found.samples = [(path, label) for path, label in found.samples if label not in odd]
    if mode == "join":
        found.samples = [(path, join_symbols(label)) for path, label in found.samples]
    found.source = dataclasses.replace(found.source, spaces=mode)
    if why:
        found.decision = f"{found.decision}; spaces: {why}" if found.decision else f"labels: {why}"
    return found


def add_label_flags(parser, unset=None, unset_means="auto"):
    """The flags that say how a folder's labels are read, the same in every script: --labels_from, --labels,
    --label_spaces. `unset`: the rule's and the spaces' value when not given (None: the script decides, e.g.
    test.py from the model); `unset_means`: what the help says that is."""
    parser.add_argument("--labels_from", default=unset, help=f"how file names give the labels: auto, name, prefix, "
                                                             f"suffix or regex:PATTERN (default: {unset_means})")
    parser.add_argument("--labels", metavar="FILE", help="a labels file instead: CSV/TSV file,label rows, a JSON or "
                                                         "Python dict, one label per line")
    parser.add_argument("--label_spaces", default=unset, choices=SPACES,
                        help=f"a space between a label's symbols: auto (joined when every label has one between each "
                             f"symbol), join, keep (a symbol) (default: {unset_means})")


def find_labels(folder, labels_from="auto", labels_file=None, spaces="auto"):
    """The labelled images of `folder` (sorted by path) and what was skipped, by file-name rule or labels file;
    `spaces` (auto, join, keep): what a space between symbols means."""
    folder = Path(folder)
    paths = list_images(folder)
    if labels_file:
        return _apply_spaces(_from_file(folder, paths, labels_file), spaces)
    return _apply_spaces(_from_names(folder, paths, check_rule(labels_from)), spaces)


def asked_colours(folder, labels_file):
    """{path: the colour its captcha asks for} of every image of `folder` that `labels_file`'s colour column gives
    one, labelled or not (an unlabelled folder's file, its label column empty)."""
    folder = Path(folder)
    return _from_file(folder, list_images(folder), labels_file).asked


def find_labels_as(folder, source):
    """`folder` read by a stored LabelSource (a model's, a run's): the same rule, the same spaces, or the same
    labels file checked to be unchanged."""
    if source.rule != "file":
        return find_labels(folder, source.rule, spaces=source.spaces)
    found = find_labels(folder, labels_file=source.labels_file, spaces=source.spaces)
    if source.sha256 and found.source.sha256 != source.sha256:
        raise CaptchaError(f"{source.labels_file}: changed since the run started (its SHA-256 differs)")
    return found
