"""`lmtune quickstart --vision` end to end on the CPU: SmolLM2 + a random tower learn to count shapes
on pictures from another seed far above chance (25% per question); both questions are scored."""

from __future__ import annotations

import random

import pytest

from lmtune.quickstart_vision import CIRCLE, COLOURS, answer, make_picture, write_dataset


def test_pictures_are_what_their_answers_say(tmp_path):
    rng = random.Random(3)
    for _ in range(20):
        img, facts = make_picture(rng)
        pixels = img.load()
        found = {}  # each 16x16 cell's centre colour
        for cell in range(4):
            x, y = (cell % 2) * 16 + 8, (cell // 2) * 16 + 8
            found[cell] = pixels[x, y]
        shapes = [c for c in found.values() if c != (255, 255, 255)]
        assert len(shapes) == 1 + facts["circles"]
        assert [c for c in shapes if c != CIRCLE] == [COLOURS[answer(facts, "colour")]]
    data = write_dataset(tmp_path, 5, seed=1)
    assert len(data.read_text().splitlines()) == 10  # two questions per picture


@pytest.mark.slow
def test_vision_quickstart_counts_shapes_on_held_out_pictures(tmp_path, capsys):
    from lmtune.cli import main

    assert main(["quickstart", "--vision", "--work-dir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("held-out accuracy"))
    colour = int(line.split("colour of the square ")[1].split("%")[0])
    count = int(line.split("number of circles ")[1].split("%")[0])
    # Counting is learned (80% in the run that printed it); naming the square's colour is not yet
    # (27%, about chance: see docs/vision.md). Both are parsed from the printout; counting is held.
    assert count >= 45, (line, colour)  # chance: 25% each
    assert (tmp_path / "work" / "hf" / "config.json").is_file()
