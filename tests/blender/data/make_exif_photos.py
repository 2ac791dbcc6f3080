"""Writes the EXIF test photos of tests/blender/core/test_exif.py with Pillow (run with the server's .venv)."""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
EXIF_IFD, FOCAL_35MM = 0x8769, 41989


def photo(name: str, focal: int | None, in_exif_ifd: bool = True) -> None:
    image = Image.new("RGB", (16, 12), (90, 120, 150))
    exif = Image.Exif()
    exif[0x010F] = "amodal3r tests"  # Make: an IFD0 entry before the pointer
    if focal is not None:
        (exif.get_ifd(EXIF_IFD) if in_exif_ifd else exif)[FOCAL_35MM] = focal
    image.save(HERE / name, "JPEG", exif=exif)


if __name__ == "__main__":
    photo("focal_28mm.jpg", 28)
    photo("focal_35mm_in_ifd0.jpg", 35, in_exif_ifd=False)
    photo("focal_0mm.jpg", 0)
    photo("no_focal.jpg", None)
