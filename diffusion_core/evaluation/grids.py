"""Pictures of samples for a person to look at: image grids, with captions and verdicts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def grid_image(rows: list[torch.Tensor], size: int) -> np.ndarray:
    """Rows of uint8 [N, h, w, 3] images, each upsampled (nearest) to ``size``, tiled with a
    1-pixel gap: a [rows*(size+1)-1, N*(size+1)-1, 3] array."""
    n = rows[0].shape[0]
    out = np.full((len(rows) * (size + 1) - 1, n * (size + 1) - 1, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for c in range(n):
            img = imgs[c].numpy()
            f = size // img.shape[0]
            img = img.repeat(f, 0).repeat(f, 1)
            out[r * (size + 1) : r * (size + 1) + size, c * (size + 1) : c * (size + 1) + size] = (
                img
            )
    return out


def caption_grid(
    images: np.ndarray,
    captions: list[str],
    matches: list[bool] | None = None,
    scale: int = 4,
    cols: int = 4,
) -> Any:
    """A PIL grid of uint8 [N, H, W, 3] images (upscaled ``scale``x), each above its caption;
    with ``matches``, a green (match) or red (no match) frame and "OK"/"NO" before the caption."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    cell_w, text_h = max(w * scale, 150), 40
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * (h * scale + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        r, c = divmod(i, cols)
        x, y = c * cell_w, r * (h * scale + text_h)
        big = Image.fromarray(img).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        left = x + (cell_w - w * scale) // 2
        grid.paste(big, (left, y))
        if matches is not None:
            colour = (30, 160, 60) if matches[i] else (220, 30, 30)
            draw.rectangle(
                (left, y, left + w * scale - 1, y + h * scale - 1), outline=colour, width=2
            )
            cap = ("OK  " if matches[i] else "NO  ") + cap
        words, lines, line = cap.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > cell_w // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:3]):
            draw.text((x + 3, y + h * scale + 2 + 12 * k), text, fill="black")
    return grid
