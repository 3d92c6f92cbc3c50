"""Draw the example subjects: a red cube with a yellow star, photographed on four backgrounds
(subject/), and a blue ball with a white stripe on three (ball/: the second subject of
local-tiny-subjects.yaml).

The photos in subject/ and ball/ were made with `python examples/local/make_subject.py`; they are
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
BLUE, WHITE = (30, 60, 200), (250, 250, 250)


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


def draw_ball(image: Image.Image, cx: int, cy: int, radius: int) -> None:
    draw = ImageDraw.Draw(image)
    shadow = [cx - radius, cy + radius - 6, cx + radius + 6, cy + radius + 6]
    draw.ellipse(shadow, fill=(40, 40, 40))
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=BLUE)
    draw.line([cx - radius + 4, cy, cx + radius - 4, cy], fill=WHITE, width=max(3, radius // 5))


def main() -> None:
    here = Path(__file__).parent
    for directory, draw, scenes in (
        (here / "subject", draw_cube, SCENES),
        (here / "ball", draw_ball, dict(list(SCENES.items())[1:])),
    ):
        directory.mkdir(exist_ok=True)
        for name, (top, bottom, cx, cy, size) in scenes.items():
            image = gradient(top, bottom)
            draw(image, cx, cy, size)
            image = image.filter(ImageFilter.SMOOTH)  # a little softness, like a photo
            image.save(directory / f"{name}.jpg", quality=85)


if __name__ == "__main__":
    main()
