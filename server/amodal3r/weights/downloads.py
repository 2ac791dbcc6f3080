"""Which model files a model folder holds, and fetching the missing official ones.

The Amodal3R checkpoints come through ``huggingface_hub`` (it verifies what it writes); DINOv2
and SAM are plain HTTPS files, fetched here into ``NAME.part`` so that an interrupted download
resumes with a Range request, checked against their size and the SHA-256 prefix their names
publish, then renamed into place. Without a network, one error lists every file and its URL so
that a user can copy them by hand. Only the standard library is imported up front: a web server
asks for the inventory on every status request.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from amodal3r.api.environment import HF_OFFLINE
from amodal3r.api.errors import Cancelled, DownloadError
from amodal3r.weights.layout import (
    CHECKPOINT_SUFFIXES,
    DOWNLOAD_BASE,
    HF_REPO,
    IMAGE_ENCODER_FILES,
    IMAGE_ENCODER_SOURCE,
    PIPELINE_FILE,
    SAM_FILES,
    SAM_FOLDER,
    SAM_SOURCE_FOLDER,
    pipeline_models,
)

HF_ENDPOINT: str | None = None  # None: huggingface_hub's own (its HF_ENDPOINT variable, else huggingface.co)
HTTPS_BASE = DOWNLOAD_BASE  # a module setting: tests point it at a loopback server
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
# torch.hub's convention: the name ends in the first hex digits of the file's SHA-256.
PUBLISHED_SHA256 = re.compile(r"[-_]([0-9a-f]{6,64})\.[A-Za-z0-9]+$")
TRUE_WORDS = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class RemoteFile:
    """One file: where it goes in the model folder and where it comes from."""

    path: str  # relative to the model folder
    source: str  # relative to HTTPS_BASE, or the path in the Hugging Face repo
    accepts: tuple[str, ...] = ()  # other paths in the model folder that serve as well


@dataclass(frozen=True)
class Component:
    """A named set of files a user downloads together."""

    name: str
    description: str
    files: tuple[RemoteFile, ...] = ()
    hf_repo: str | None = None  # the files are this repo's pipeline.json and the checkpoints it names


@dataclass
class ComponentStatus:
    """What a model folder holds of one component, JSON-ready through ``asdict``."""

    name: str
    description: str
    present: bool
    missing: list[str]  # paths relative to the model folder
    bytes_on_disk: int


@dataclass
class DownloadProgress:
    """One progress report: enough for a bar per file and one for the whole download."""

    component: str
    file: str  # path relative to the model folder
    bytes_done: int
    bytes_total: int | None
    files_done: int
    files_total: int


def _sam(kind: str, description: str) -> Component:
    name = SAM_FILES[kind]
    return Component(f"sam_{kind}", description, (RemoteFile(f"{SAM_FOLDER}/{name}", f"{SAM_SOURCE_FOLDER}/{name}"),))


CATALOG: dict[str, Component] = {
    c.name: c
    for c in (
        Component("amodal3r", "Amodal3R pipeline: pipeline.json and its checkpoints", hf_repo=HF_REPO),
        Component(
            "dinov2",
            "DINOv2 ViT-L/14 with registers: the image encoder",
            (RemoteFile(IMAGE_ENCODER_FILES[1], IMAGE_ENCODER_SOURCE, accepts=IMAGE_ENCODER_FILES[:1]),),
        ),
        _sam("vit_h", "Segment Anything ViT-H: the best masks"),
        _sam("vit_l", "Segment Anything ViT-L"),
        _sam("vit_b", "Segment Anything ViT-B: the smallest and fastest"),
    )
}


def component_files(component: Component, model_dir: Path) -> list[RemoteFile]:
    """The component's files; for a Hugging Face pipeline, those its pipeline.json names."""
    if component.hf_repo is None:
        return list(component.files)
    paths = [PIPELINE_FILE] + [stem + suffix for stem in pipeline_models(model_dir) for suffix in CHECKPOINT_SUFFIXES]
    return [RemoteFile(p, p) for p in paths]


def source_url(component: Component, file: RemoteFile) -> str:
    """Where the file is downloaded from, read at call time so that the base settings apply."""
    if component.hf_repo is None:
        return f"{HTTPS_BASE}/{file.source}"
    return f"{_hf_endpoint()}/{component.hf_repo}/resolve/main/{file.source}"


def _hf_endpoint() -> str:
    if HF_ENDPOINT is not None:
        return HF_ENDPOINT
    from huggingface_hub import constants

    return constants.ENDPOINT


def _found(model_dir: Path, file: RemoteFile) -> Path | None:
    """The file on disk, or one of the alternatives it accepts."""
    return next((model_dir / p for p in (file.path, *file.accepts) if (model_dir / p).is_file()), None)


def inventory(model_dir: str | Path) -> list[ComponentStatus]:
    """Every catalog component: present or not, what is missing, what the present files weigh."""
    model_dir = Path(model_dir)
    statuses = []
    for component in CATALOG.values():
        found = {f.path: _found(model_dir, f) for f in component_files(component, model_dir)}
        missing = [path for path, on_disk in found.items() if on_disk is None]
        size = sum(on_disk.stat().st_size for on_disk in found.values() if on_disk is not None)
        statuses.append(ComponentStatus(component.name, component.description, not missing, missing, size))
    return statuses


def _missing_files(model_dir: Path, names: list[str]) -> list[tuple[Component, RemoteFile]]:
    return [
        (CATALOG[n], f) for n in names for f in component_files(CATALOG[n], model_dir) if _found(model_dir, f) is None
    ]


def download(
    model_dir: str | Path,
    components: Iterable[str],
    progress: Callable[[DownloadProgress], None],
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Fetch the missing files of ``components``, one at a time, reporting progress as bytes arrive.

    The missing list is taken again after each file: pipeline.json, once here, says which
    checkpoints follow it. Raises DownloadError (with the files to copy by hand when the network
    fails) or Cancelled.
    """
    model_dir, names, cancelled = Path(model_dir), list(components), cancelled or (lambda: False)
    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        raise ValueError(f"unknown model component(s) {unknown}; choose from {sorted(CATALOG)}")
    if os.environ.get(HF_OFFLINE, "").upper() in TRUE_WORDS:
        raise _by_hand(model_dir, names, f"{HF_OFFLINE} is set")
    done = 0
    while todo := _missing_files(model_dir, names):
        component, file = todo[0]
        if cancelled():
            raise Cancelled(f"download cancelled before {file.path}")
        files_total = done + len(todo)
        report = _reporter(progress, component, file, done, files_total)
        report(0, None)
        _fetch(model_dir, names, component, file, report, cancelled)
        done += 1
        size = (model_dir / file.path).stat().st_size
        progress(DownloadProgress(component.name, file.path, size, size, done, files_total))


def _reporter(
    progress: Callable[[DownloadProgress], None],
    component: Component,
    file: RemoteFile,
    files_done: int,
    files_total: int,
) -> Callable[[int, int | None], None]:
    """Byte counts of one file as the caller's progress records."""

    def report(bytes_done: int, bytes_total: int | None) -> None:
        progress(DownloadProgress(component.name, file.path, bytes_done, bytes_total, files_done, files_total))

    return report


def _fetch(
    model_dir: Path,
    names: list[str],
    component: Component,
    file: RemoteFile,
    report: Callable[[int, int | None], None],
    cancelled: Callable[[], bool],
) -> None:
    """One file into place, any failure but a cancel turned into the copy-by-hand error."""
    try:
        if component.hf_repo is None:
            fetch_https(source_url(component, file), model_dir / file.path, report, cancelled)
        else:
            _fetch_hf(component.hf_repo, file, model_dir, report, cancelled)
    except (DownloadError, Cancelled):
        raise
    except Exception as error:  # offline, refused, interrupted: one message with the way out
        if cancelled():
            raise Cancelled(f"download of {file.path} cancelled") from error
        raise _by_hand(model_dir, names, f"{file.path}: {type(error).__name__}: {error}") from error
    if not (model_dir / file.path).is_file():
        raise DownloadError(f"the download of {file.path} finished but {model_dir / file.path} is not there")


def _by_hand(model_dir: Path, names: list[str], reason: str) -> DownloadError:
    """The error that tells exactly which files to copy where, for a machine without network."""
    lines = [
        f"  {source_url(c, f)}\n    -> {(model_dir / f.path).resolve()}" for c, f in _missing_files(model_dir, names)
    ]
    return DownloadError(
        f"could not download the models ({reason}). Download these files on a connected "
        "machine and place each at the path shown:\n" + "\n".join(lines)
    )


def _fetch_hf(
    repo: str,
    file: RemoteFile,
    model_dir: Path,
    report: Callable[[int, int | None], None],
    cancelled: Callable[[], bool],
) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(
        repo, file.source, local_dir=model_dir, endpoint=HF_ENDPOINT, tqdm_class=_progress_bar(report, cancelled)
    )


def _progress_bar(report: Callable[[int, int | None], None], cancelled: Callable[[], bool]) -> type:
    """A silent tqdm class for huggingface_hub that passes bytes on and raises on cancel."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0
            report(int(self.n), self.total)
            if cancelled():
                raise Cancelled("download cancelled")

        def update_transfer(self, n: int) -> None:
            """Network bytes (compressed, deduplicated): ``update`` counts the bytes written instead."""

    return Bar


def published_sha256(name: str) -> str | None:
    """The SHA-256 prefix a file name carries (``sam_vit_b_01ec64.pth``), if any."""
    match = PUBLISHED_SHA256.search(name)
    return match.group(1) if match else None


def fetch_https(url: str, dest: Path, report: Callable[[int, int | None], None], cancelled: Callable[[], bool]) -> None:
    """Download into ``dest.part`` (resuming what is there), verify, rename into place."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        total, digest = _stream(url, part, report, cancelled)
    except HTTPError as error:
        if error.code != 416 or not part.is_file():
            raise
        part.unlink()  # the part is as long as the file or longer, so no range of it is left: start over
        total, digest = _stream(url, part, report, cancelled)
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(
            f"the connection closed after {size} of {total} bytes; run the download again to resume it"
        )
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(
            f"{url}: got {size} bytes, more than the {total} the server announced; the "
            "partial file was deleted, run the download again"
        )
    expected = published_sha256(dest.name)
    if expected is not None and not digest.hexdigest().startswith(expected):
        part.unlink()
        raise DownloadError(
            f"{url}: SHA-256 {digest.hexdigest()[:12]}... does not start with {expected} as its "
            "name says: the file is corrupt and was deleted, run the download again"
        )
    os.replace(part, dest)


def _stream(
    url: str, part: Path, report: Callable[[int, int | None], None], cancelled: Callable[[], bool]
) -> tuple[int | None, hashlib._Hash]:
    """Append the rest of ``url`` to ``part``; returns the full size announced and the hash of it all."""
    offset = part.stat().st_size if part.is_file() else 0
    digest = _sha256_of(part) if offset else hashlib.sha256()
    request = Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urlopen(request, timeout=TIMEOUT_S) as response, part.open("ab") as out:
        if offset and response.status != 206:  # the server ignored the range: it sends everything
            out.truncate(0)
            offset, digest = 0, hashlib.sha256()
        total = _announced_size(response, offset)
        done = offset
        report(done, total)
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            report(done, total)
            if cancelled():
                raise Cancelled(f"download of {url} cancelled at {done} bytes; run it again to resume")
    return total, digest


def _announced_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The whole file's size: Content-Range's total for a resumed download, else Content-Length."""
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None and length.isdigit() else None


def _sha256_of(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest
