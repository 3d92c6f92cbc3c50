"""Draw the example subject: a red cube with a yellow star, photographed on four backgrounds.

The photos in subject/ were made with `python examples/local/make_subject.py`; they are
committed, so nobody needs to run this (it is here to show where they come from).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
# (background top, background bottom, cube centre x, centre y, cube half-size)
SCENES = {
    "sky": ((120, 170, 230), (200, 225, 250), 64, 70, 30),
    "grass": ((150, 200, 110), (60, 120, 40), 52, 76, 26),
    "beach": ((110, 180, 220), (230, 210, 160), 76, 68, 32),
    "table": ((90, 70, 60), (150, 110, 80), 60, 60, 28),
}
RED, DARK_RED, LIGHT_RED, YELLOW = (210, 30, 40), (140, 15, 25), (240, 80, 80), (250, 210, 30)


def gradient(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):
        t = y / (SIZE - 1)
        color = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (SIZE, y)], fill=color)
    return image


def star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    import math

    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy - r * math.sin(angle)))
    return points


def draw_cube(image: Image.Image, cx: int, cy: int, half: int) -> None:
    draw = ImageDraw.Draw(image)
    depth = half // 2
    front = [
        (cx - half, cy - half + depth),
        (cx + half - depth, cy - half + depth),
        (cx + half - depth, cy + half),
        (cx - half, cy + half),
    ]
    top = [
        (cx - half, cy - half + depth),
        (cx - half + depth, cy - half),
        (cx + half, cy - half),
        (cx + half - depth, cy - half + depth),
    ]
    side = [
        (cx + half - depth, cy - half + depth),
        (cx + half, cy - half),
        (cx + half, cy + half - depth),
        (cx + half - depth, cy + half),
    ]
    draw.ellipse([cx - half, cy + half - 6, cx + half + 6, cy + half + 6], fill=(40, 40, 40))
    draw.polygon(front, fill=RED)
    draw.polygon(top, fill=LIGHT_RED)
    draw.polygon(side, fill=DARK_RED)
    draw.polygon(star(cx - depth / 2, cy + depth / 2, half * 0.55), fill=YELLOW)


def main() -> None:
    out = Path(__file__).parent / "subject"
    out.mkdir(exist_ok=True)
    for name, (top, bottom, cx, cy, half) in SCENES.items():
        image = gradient(top, bottom)
        draw_cube(image, cx, cy, half)
        image = image.filter(ImageFilter.SMOOTH)  # a little softness, like a photo
        image.save(out / f"{name}.jpg", quality=85)


if __name__ == "__main__":
    main()
