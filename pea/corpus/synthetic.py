"""A deterministic synthetic bilingual corpus ("two blue squares at the top") and a loopback server for it.

The embedded default downloads this corpus with img2dataset over real HTTP, so every stage runs the
code path of a real corpus. Besides the good samples the manifest holds one broken entry per drop
reason of the filter stage (see `BROKEN`), so a run always exercises and counts every reason.

Web-like noise, from `corpus.synthetic` (all off in the clean world): a share of pairs whose image shows
another scene (`mismatched`), a share whose captions leave the position out (`partial`), and native-only
rows that say a culture-specific phrase (`culture_rows`, pea.corpus.culture). The English side is always a
faithful translation of the target caption; only the image or the caption's coverage is noisy.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import random
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pea.io.atomic import publish
from pea.spec import SLOTS, CulturePhrase, LanguageSpec, SyntheticCaptions

ENGLISH = SyntheticCaptions(
    template="{count} {color} {shape} {position}",
    counts={"one": "one", "two": "two"},
    colors={c: c for c in ("red", "green", "blue", "yellow", "purple", "orange")},
    shapes={s: s for s in ("circle", "square", "triangle")},
    positions={"left": "on the left", "right": "on the right", "top": "at the top",
               "bottom": "at the bottom", "center": "in the center"},
)

RGB = {"red": (214, 40, 40), "green": (46, 158, 68), "blue": (36, 86, 214),
       "yellow": (236, 190, 20), "purple": (132, 64, 176), "orange": (244, 128, 24)}
BACKGROUND = (242, 240, 235)
# Each position owns a half-size box (x0, y0, x1, y1) in unit coordinates.
REGIONS = {"left": (0.0, 0.25, 0.5, 0.75), "right": (0.5, 0.25, 1.0, 0.75), "top": (0.25, 0.0, 0.75, 0.5),
           "bottom": (0.25, 0.5, 0.75, 1.0), "center": (0.25, 0.25, 0.75, 0.75)}
COUNTS = {"one": 1, "two": 2}
SUPERSAMPLE = 4  # draw large, then downscale: clean edges even at 32x32

# Manifest entries that must fail, each with the filter reason it triggers. The 404 URL is never written.
BROKEN = {"missing": "download_http_error", "corrupt": "download_not_image", "tiny": "too_small", "wide": "bad_aspect",
          "empty-caption": "caption_empty", "long-caption": "caption_too_long", "not-text": "caption_not_text",
          "wrong-language": "wrong_language", "duplicate": "duplicate_image", "ftp": "bad_url"}


@dataclass(frozen=True)
class Scene:
    count: str
    color: str
    shape: str
    position: str


def all_scenes() -> list[Scene]:
    """Every combination of the English vocabulary, in a fixed order."""
    return [Scene(*combo) for combo in itertools.product(COUNTS, RGB, ENGLISH.shapes, REGIONS)]


def caption(scene: Scene, captions: SyntheticCaptions, partial: bool = False) -> str:
    """The scene in the captions' language; `partial` leaves the position out (and collapses the spaces)."""
    words = {"count": captions.counts[scene.count], "color": captions.colors[scene.color],
             "shape": captions.shapes[scene.shape], "position": captions.positions[scene.position]}
    if captions == ENGLISH and COUNTS[scene.count] > 1:
        words["shape"] += "s"  # the spec schema has no plural forms; English needs only this one
    if partial:
        return " ".join(captions.template.format(**(words | {"position": ""})).split())
    return captions.template.format(**words)


def mismatch(scene: Scene, rng: random.Random) -> Scene:
    """Another scene: 1 to 4 of the attributes changed (all four: an unrelated picture)."""
    changed = rng.sample(SLOTS, rng.randint(1, len(SLOTS)))
    values = {slot: getattr(scene, slot) for slot in SLOTS}
    for slot in changed:
        values[slot] = rng.choice([v for v in getattr(ENGLISH, slot + "s") if v != values[slot]])
    return Scene(**values)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.88  # about the circle's area, so no shape looks bigger
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        R, cy = r * 1.15, cy + r * 0.2  # circumradius; shift down so the bounding box is centred
        draw.polygon([(cx, cy - R), (cx + R * 0.866, cy + R * 0.5), (cx - R * 0.866, cy + R * 0.5)], fill=fill)


def render(scene: Scene, size: int, seed: int) -> Image.Image:
    """The scene's shape(s) on a plain light background, with a small jitter drawn from `seed`."""
    rng = random.Random(seed)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = REGIONS[scene.position]
    n = COUNTS[scene.count]
    cell = (x1 - x0) / n  # objects sit side by side, one cell each
    for i in range(n):
        cx = x0 + cell * (i + 0.5) + rng.uniform(-0.02, 0.02)
        cy = (y0 + y1) / 2 + rng.uniform(-0.02, 0.02)
        r = min(cell, y1 - y0) * rng.uniform(0.36, 0.42)
        _draw_shape(draw, scene.shape, cx * big, cy * big, r * big, RGB[scene.color])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_words(captions: SyntheticCaptions, where: str) -> None:
    for slot in ("counts", "colors", "shapes", "positions"):
        missing = sorted(set(getattr(ENGLISH, slot)) - set(getattr(captions, slot)))
        if missing:
            raise ValueError(f"{where}.{slot} lacks {missing}; add a word for each")
    for i, phrase in enumerate(captions.culture):
        for slot, value in phrase.means.items():
            if value not in getattr(ENGLISH, slot + "s"):
                raise ValueError(f"{where}.culture[{i}] ({phrase.phrase}) means {slot} {value!r}, which the synthetic "
                                 f"world lacks; use one of {list(getattr(ENGLISH, slot + 's'))}")


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    with publish(path, "synthetic corpus: file") as tmp:  # the server never hands out half a file
        tmp.write_bytes(data)


# Culture-specific phrases (synthetic_captions.culture): target-language words for a scene that English says otherwise.
HELD_OUT_SHARE = 3  # one scene in three of each phrase is held out


def culture_caption(scene: Scene, phrase: CulturePhrase, captions: SyntheticCaptions) -> str:
    """The caption of `scene` that says the phrase for the attributes the phrase means."""
    for slot, value in phrase.means.items():
        if getattr(scene, slot) != value:
            raise ValueError(f"{phrase.phrase!r} means {slot} {value}, but the scene's {slot} is {getattr(scene, slot)}")
    template = phrase.template or _default_template(phrase, captions.template)
    words = {slot: getattr(captions, slot + "s")[getattr(scene, slot)] for slot in SLOTS if slot not in phrase.means}
    return " ".join(template.format(**words).split())


def _default_template(phrase: CulturePhrase, template: str) -> str:
    """The language's template with the phrase in the first slot it means and its other slots dropped."""
    slots = [s for s in re.findall(r"\{(\w+)\}", template) if s in phrase.means]
    out = template.replace("{" + slots[0] + "}", phrase.phrase.replace("{", "{{").replace("}", "}}"), 1)
    for slot in slots[1:]:
        out = out.replace("{" + slot + "}", "")
    return out


def _scenes_of(phrase: CulturePhrase) -> list[Scene]:
    choices = [[phrase.means[s]] if s in phrase.means else list(getattr(ENGLISH, s + "s")) for s in SLOTS]
    return [Scene(*combo) for combo in itertools.product(*choices)]


def culture_scenes(captions: SyntheticCaptions) -> tuple[list[tuple[Scene, str]], list[tuple[Scene, str]]]:
    """(training, held out): every (scene, culture caption) of the spec's phrases, split by caption hash."""
    training, heldout = [], []
    for phrase in captions.culture:
        pairs = sorted(((s, culture_caption(s, phrase, captions)) for s in _scenes_of(phrase)),
                       key=lambda pair: hashlib.sha256(pair[1].encode()).hexdigest())
        cut = max(1, len(pairs) // HELD_OUT_SHARE)
        heldout += pairs[:cut]
        training += pairs[cut:]
    return training, heldout


def word_by_word(text: str, captions: SyntheticCaptions) -> str:
    """The target prompt translated word by word into English with the synthetic lexicon, kept in the target's
    word order (what a dictionary, not a translation model, gives). Longest match first; words the lexicon lacks
    (particles, glue) are dropped. Space-separated languages match whole words (else a word's longest lexicon
    prefix), others match characters."""
    lexicon: dict[str, str] = {}
    for slot in ("counts", "colors", "shapes", "positions"):
        for key, word in getattr(captions, slot).items():
            lexicon.setdefault(word.strip(), getattr(ENGLISH, slot)[key])
    spaced = " " in text.strip() or any(" " in w for w in lexicon)
    units = [u.strip(".,;:!?\"'()") for u in text.split()] if spaced else list(text)
    glue = " " if spaced else ""
    longest = max(len(w.split()) if spaced else len(w) for w in lexicon)
    out, i = [], 0
    while i < len(units):
        for j in range(min(len(units), i + longest), i, -1):
            if (english := lexicon.get(glue.join(units[i:j]))) is not None:
                out.append(english)
                i = j
                break
        else:  # an inflected or agglutinated word (Korean 왼쪽에 = 왼쪽 + 에): its longest lexicon prefix, if any
            stems = [w for w in lexicon if spaced and " " not in w and units[i].startswith(w)]
            if stems:
                out.append(lexicon[max(stems, key=len)])
            i += 1
    return " ".join(out)


def make_corpus(spec: LanguageSpec, out_dir: Path) -> Path:
    """Write images/ and manifest.parquet (url relative to out_dir, caption_en, the caption column, native) into
    out_dir: `size` parallel pairs, then `culture_rows` native-only rows (caption_en empty), the noise of
    `corpus.synthetic` drawn from its own generator (so the clean world's images do not depend on it).

    The entries of `BROKEN` follow the good samples; `wrong-language` only when the spec checks the language.

    Deterministic; files whose content is already right are left untouched. Returns the manifest path.
    """
    synthetic, target = spec.corpus.synthetic, spec.synthetic_captions
    if synthetic is None or target is None:
        raise ValueError(f"spec {spec.language} has no corpus.synthetic/synthetic_captions; set both to use the synthetic corpus")
    _check_words(target, "synthetic_captions")
    pixels = spec.corpus.image_size * 2  # larger than the target size, so img2dataset really resizes
    scenes = all_scenes()
    rng = random.Random(synthetic.seed)
    files: dict[str, bytes] = {}
    rows: list[tuple[str, str, str, bool]] = []
    seen: set[str] = set()
    noise = random.Random(f"{synthetic.seed}-noise")

    culture = culture_scenes(target)[0]
    if synthetic.culture_rows and not culture:
        raise ValueError(f"spec {spec.language}: corpus.synthetic.culture_rows is {synthetic.culture_rows} but "
                         "synthetic_captions.culture lists no phrase; add phrases or set culture_rows to 0")
    # Exact shares, as the spec says them.
    wrong = set(noise.sample(range(synthetic.size), round(synthetic.mismatched * synthetic.size)))
    native_share = synthetic.mismatched if synthetic.native_mismatched is None else synthetic.native_mismatched
    wrong_native = set(noise.sample(range(synthetic.culture_rows), round(native_share * synthetic.culture_rows)))
    partial = set(noise.sample(range(synthetic.size), round(synthetic.partial * synthetic.size)))

    def image(scene: Scene) -> bytes:
        seed = rng.getrandbits(32)
        while True:  # a jitter that repeats an earlier image of the scene would make a duplicate: move on
            data = _png(render(scene, pixels, seed))
            digest = hashlib.sha256(data).hexdigest()
            if digest not in seen:
                seen.add(digest)
                return data
            seed += 1

    def url(name: str, data: bytes | None) -> str:
        """Named by content too: a corpus whose noise changed serves other bytes under other URLs, so acquire
        re-downloads them instead of keeping the shards of the same URLs (as it would for a real site)."""
        if data is None:
            return f"images/{name}.png"
        path = f"images/{name}-{hashlib.sha256(data).hexdigest()[:12]}.png"
        files[path] = data
        return path

    def add(name: str, scene: Scene, data: bytes | None, target_caption: str | None = None, part: bool = False) -> None:
        text = caption(scene, target, part) if target_caption is None else target_caption
        rows.append((url(name, data), caption(scene, ENGLISH, part), text, False))

    for i in range(synthetic.size):
        scene = scenes[i % len(scenes)]
        add(f"{i:05d}", scene, image(mismatch(scene, noise) if i in wrong else scene), part=i in partial)
    for j in range(synthetic.culture_rows):  # native-only: the culture caption, no English side
        scene, text = culture[j % len(culture)]
        data = image(mismatch(scene, noise) if j in wrong_native else scene)
        rows.append((url(f"culture-{j:05d}", data), "", text, True))
    # One broken entry per filter reason (BROKEN), each failing in that one way only.
    scene = scenes[synthetic.size % len(scenes)]
    good = image(scene)
    add("missing", scene, None)  # never written: a 404
    add("corrupt", scene, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # a PNG signature, then garbage
    add("tiny", scene, _png(render(scene, 4, synthetic.seed)))
    wide = (int(pixels * (spec.filter.max_aspect_ratio + 1)), pixels)
    add("wide", scene, _png(render(scene, pixels, synthetic.seed).resize(wide)))
    add("empty-caption", scene, good, " ")
    text = caption(scene, target)
    add("long-caption", scene, good, text * (spec.filter.max_caption_chars // len(text) + 1))
    add("not-text", scene, good, "#" * max(spec.filter.min_caption_chars, 8))
    if spec.filter.language_id is not None:
        add("wrong-language", scene, good, caption(scene, ENGLISH))  # English where the target language belongs
    rows.append(rows[0])  # the same URL and captions as sample 0: a duplicate
    rows.append(("ftp://127.0.0.1/" + rows[0][0], *rows[0][1:]))  # never fetched: http(s) only

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_if_changed(out_dir / name, data)
    urls, english, captions, native = (list(column) for column in zip(*rows))
    table = pa.table({"url": urls, "caption_en": english, spec.caption_column: captions, "native": native})
    manifest = out_dir / "manifest.parquet"
    if manifest.is_file() and pq.read_table(manifest).equals(table):
        return manifest
    with publish(manifest, "synthetic corpus: manifest") as tmp:
        pq.write_table(table, tmp)
    return manifest


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # one line per image would drown img2dataset's progress


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 (a free port) from a daemon thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="pea-corpus-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_pairs(folder: Path, spec: LanguageSpec, scenes: list[Scene], seed: int = 0) -> Path:
    """A raw shard of PNG bytes and a pairs table pointing at it, in the layout acquire + filter leave,
    for tests and benchmarks of the later stages that need no download. Returns the pairs path."""
    images = [_png(render(scene, spec.corpus.image_size, seed=seed + i)) for i, scene in enumerate(scenes)]
    keys = [f"{i:07d}" for i in range(len(scenes))]
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f"raw-{spec.language}.parquet"
    pq.write_table(pa.table({"key": keys, spec.corpus.encode_format: images}), raw)
    size = [spec.corpus.image_size] * len(keys)
    pairs = folder / f"pairs-{spec.language}.parquet"
    pq.write_table(pa.table({
        "key": keys, "image_sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "caption_en": [caption(s, ENGLISH) for s in scenes],
        "caption": [caption(s, spec.synthetic_captions) for s in scenes],
        "width": size, "height": size, "raw_file": [str(raw)] * len(keys), "native": [False] * len(keys)}), pairs)
    return pairs
