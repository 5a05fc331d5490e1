"""`lmerge preview` and `lmerge tree --previews` (lineage/graph/previews.py) on tiny generated checkpoints:
1–2 sampling steps at the smallest size the tiny model takes."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from adapter_samples import modules_of, write_lora
from PIL import Image
from test_page import data_of
from test_sampling import files_hashed, parse_parameters

import lineage
from lineage.graph import previews
from lineage.graph.previews import StepTimer, duration
from lineage.io.hashing import hash_file

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


@pytest.fixture(scope="module")
def side(family) -> int:
    """The smallest image side the tiny model draws (its VAE and UNet downsampling), read from the model."""
    from lineage.train.loading import load_sdxl
    from lineage.train.sampling import size_multiple

    model = load_sdxl(family["base"])
    return size_multiple(model.unet, model.vae)


@pytest.fixture
def base(family, tmp_path, lmerge) -> str:
    """A recorded copy of the tiny base (tests rename and delete it)."""
    path = tmp_path / "base.safetensors"
    shutil.copy(family["base"], path)
    assert lmerge("add", path)[0] == 0
    return str(path)


def draw(lmerge, side: int, *args) -> dict:
    code, out, err = lmerge("preview", *args, "--size", f"{side}x{side}", "--steps", 2, "--json")
    assert code == 0, err
    return json.loads(out)


def folder_of(isolated_registry, path: str):
    return isolated_registry.parent / "previews" / hash_file(path).autov3


def test_preview_writes_pngs_of_the_asked_size_under_the_autov3(lmerge, base, side, isolated_registry, tmp_path):
    result = draw(lmerge, side, base, "--prompt", "a red cube", "--prompt", "a blue ball", "--seed", 3)
    folder = folder_of(isolated_registry, base)
    assert result["previews"][0]["written"] == [str(folder / "0.png"), str(folder / "1.png")]
    for path, prompt in zip(result["previews"][0]["written"], ("a red cube", "a blue ball")):
        image = Image.open(path)
        assert image.format == "PNG" and image.size == (side, side)
        read = parse_parameters(image.text["parameters"])  # what `lmerge sample` writes
        assert read["prompt"] == prompt and read["Seed"] == "3" and read["Steps"] == "2"
        assert read["Model hash"] == hash_file(base).autov2
    assert result["seconds_per_step"] > 0
    # The same image `lineage.sample` draws with these settings.
    same = lineage.sample(base, "a blue ball", seed=3, steps=2, width=side, height=side, sampler="euler", cfg=7,
                          progress=False)[0]
    assert Image.open(folder / "1.png").tobytes() == same.tobytes()


def test_previews_are_kept_for_a_renamed_file_and_redrawn_when_asked(lmerge, base, side, isolated_registry, tmp_path):
    first = draw(lmerge, side, base, "--prompt", "a red cube", "--prompt", "a blue ball")
    # A request that fails (a size the model cannot draw) leaves the previews as they were.
    code, _, err = lmerge("preview", base, "--prompt", "a red cube", "--size", f"{side + 8}x{side}")
    assert code == 1 and "multiples of" in err
    renamed = tmp_path / "renamed.safetensors"
    shutil.move(base, renamed)
    assert lmerge("add", renamed)[0] == 0
    again = draw(lmerge, side, renamed, "--prompt", "a red cube", "--prompt", "a blue ball")["previews"][0]
    assert again["written"] == [] and again["files"] == first["previews"][0]["files"]
    assert again["checkpoint"] == str(renamed)
    forced = draw(lmerge, side, renamed, "--prompt", "a red cube", "--prompt", "a blue ball", "--force")
    assert forced["previews"][0]["written"] == again["files"]
    # Another prompt redraws that image alone; a smaller grid leaves no stale image behind.
    changed = draw(lmerge, side, renamed, "--prompt", "a red cube", "--prompt", "a green cone")["previews"][0]
    assert changed["written"] == again["files"][1:]
    smaller = draw(lmerge, side, renamed, "--prompt", "a red cube")["previews"][0]
    folder = folder_of(isolated_registry, str(renamed))
    assert smaller["written"] == [] and sorted(p.name for p in folder.glob("*.png")) == ["0.png"]
    assert [c["prompt"] for c in json.loads((folder / "previews.json").read_text())["cells"]] == ["a red cube"]


def test_an_adapter_is_drawn_on_its_base(lmerge, base, side, isolated_registry, tmp_path):
    lora = write_lora(tmp_path / "style.safetensors", modules_of(base, conv=True), rank=4, alpha=2.0)
    assert lmerge("add", lora, "--parent", base, "--relation", "adapter")[0] == 0
    result = draw(lmerge, side, lora, "--prompt", "a red cube", "--seed", 5)["previews"][0]
    assert result["checkpoint"] == base and result["adapter"] == str(lora)
    folder = folder_of(isolated_registry, str(lora))
    assert result["written"] == [str(folder / "0.png")]
    with_adapter = lineage.sample(base, "a red cube", adapters=[(lora, 1.0)], seed=5, steps=2, width=side,
                                  height=side, progress=False)[0]
    plain = lineage.sample(base, "a red cube", seed=5, steps=2, width=side, height=side, progress=False)[0]
    drawn = Image.open(folder / "0.png").tobytes()
    assert drawn == with_adapter.tobytes() and drawn != plain.tobytes()


def test_a_dtype_change_redraws_and_known_hashes_are_not_computed_again(lmerge, base, side, isolated_registry,
                                                                       tmp_path, monkeypatch):
    """The dtype is part of what an image was drawn with. The registry's hashes of the base and the adapter
    reach the infotext without a hashing pass over either file."""
    lora = write_lora(tmp_path / "style.safetensors", modules_of(base, conv=True), rank=4, alpha=2.0)
    assert lmerge("add", lora, "--parent", base, "--relation", "adapter")[0] == 0
    hashed = files_hashed(monkeypatch)
    first = draw(lmerge, side, lora, "--prompt", "a red cube")["previews"][0]
    assert hashed == [] and len(first["written"]) == 1
    read = parse_parameters(Image.open(first["written"][0]).text["parameters"])
    assert read["Model hash"] == hash_file(base).autov2
    assert read["Lora hashes"] == f'"style: {hash_file(lora).autov3[:12]}"'
    assert draw(lmerge, side, lora, "--prompt", "a red cube", "--dtype", "fp32")["previews"][0]["written"] == []
    in_bf16 = draw(lmerge, side, lora, "--prompt", "a red cube", "--dtype", "bf16")["previews"][0]
    assert in_bf16["written"] == first["files"]
    folder = folder_of(isolated_registry, str(lora))
    assert [c["dtype"] for c in json.loads((folder / "previews.json").read_text())["cells"]] == ["bf16"]
    assert draw(lmerge, side, lora, "--prompt", "a red cube", "--dtype", "bf16")["previews"][0]["written"] == []
    code, _, err = lmerge("preview", lora, "--device", "cuda:7")
    assert code == 1 and err.startswith("error: --device cuda:7: ") and len(err.strip().splitlines()) == 1


def test_bad_nodes_are_one_line_errors(lmerge, base, tmp_path, isolated_registry):
    from lineage.sdxl.synthetic import write_child

    lonely = write_lora(tmp_path / "lonely.safetensors", modules_of(base), rank=2, seed=1)
    assert lmerge("add", lonely)[0] == 0
    on_catalog = write_lora(tmp_path / "on_catalog.safetensors", modules_of(base), rank=2, seed=2)
    assert lmerge("add", on_catalog, "--parent", "sdxl-1.0-base", "--relation", "adapter")[0] == 0
    gone = write_child(base, tmp_path / "gone.safetensors", seed=7)
    assert lmerge("add", gone)[0] == 0
    os.remove(gone)
    cases = [
        (("no-such-model",), "no node 'no-such-model'"),
        (("sdxl-1.0-base",), "Stable Diffusion XL 1.0 base has no file on this machine"),
        (("gone",), f"gone has no file on this machine: it was recorded at {gone}, which is gone"),
        ((lonely,), "the adapter lonely has no recorded base model"),
        ((on_catalog,), "is drawn with its base model, and Stable Diffusion XL 1.0 base has no file"),
    ]
    for args, message in cases:
        code, out, err = lmerge("preview", *args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = lmerge("preview", base, "--size", "64")
    assert code == 2 and "'64' is not WIDTHxHEIGHT" in err and "Traceback" not in err  # click's usage error
    assert not (isolated_registry.parent / "previews").exists()
    code, _, err = lmerge("tree", "--previews")
    assert code == 1 and err.strip() == "error: --previews needs a tree with pictures (svg, html, png, pdf), not text"


def node_groups(svg: str) -> dict[str, str]:
    """Graphviz SVG: model node id (its <title>) -> the node's group (the legend's nodes left out)."""
    groups = re.finditer(r'<g id="node\d+" class="node">\s*<title>(.*?)</title>.*?</g>', svg, re.S)
    return {html.unescape(m.group(1)): m.group(0) for m in groups if not m.group(1).startswith("legend:")}


@needs_dot
def test_tree_shows_previews_embedded(lmerge, base, family, side, tmp_path):
    child = tmp_path / "child.safetensors"
    shutil.copy(family["child"], child)
    assert lmerge("add", child, "--parent", base)[0] == 0
    draw(lmerge, side, base, "--prompt", "a red cube", "--prompt", "a blue ball")
    base_id = hash_file(base).autov3

    assert lmerge("tree", base, "--down", "--previews", "-o", tmp_path / "tree.svg")[0] == 0
    svg = (tmp_path / "tree.svg").read_text()
    groups = node_groups(svg)
    assert set(groups) == {base_id, hash_file(child).autov3}
    assert groups[base_id].count("<image ") == 1 and 'xlink:href="data:image/png;base64,' in groups[base_id]
    assert svg.count("<image ") == 1  # the child has no previews: drawn as before
    assert str(tmp_path) not in svg and "lineage-thumbnails" not in svg  # no path to break when the file moves
    plain = tmp_path / "plain.svg"
    assert lmerge("tree", base, "--down", "-o", plain)[0] == 0 and "<image " not in plain.read_text()

    assert lmerge("tree", base, "--down", "--previews", "-o", tmp_path / "tree.png")[0] == 0
    with Image.open(tmp_path / "tree.png") as pictured, Image.open(_png_of(lmerge, base, tmp_path)) as without:
        assert pictured.height > without.height  # the picture makes the node taller

    assert lmerge("tree", base, "--down", "--previews", "-o", tmp_path / "tree.html")[0] == 0
    data = data_of((tmp_path / "tree.html").read_text())
    by_key = {info["key"]: info for info in data["nodes"].values()}
    assert len(by_key[base_id]["previews"]) == 2
    assert all(uri.startswith("data:image/png;base64,") for uri in by_key[base_id]["previews"])
    assert "previews" not in by_key[hash_file(child).autov3]


def _png_of(lmerge, base: str, tmp_path) -> str:
    path = tmp_path / "plain.png"
    assert lmerge("tree", base, "--down", "-o", path)[0] == 0
    return str(path)


@needs_dot
def test_a_catalog_model_shows_the_previews_of_its_linked_file(lmerge, base, side, tmp_path, caplog):
    assert lmerge("link", base, "sdxl-1.0-base")[0] == 0
    result = draw(lmerge, side, "sdxl-1.0-base", "--prompt", "a red cube")["previews"][0]
    assert result["node"] == "sdxl-1.0-base" and result["checkpoint"] == base
    assert result["folder"].endswith(f"/previews/{hash_file(base).autov3}")  # by the file's AutoV3
    assert lmerge("tree", "sdxl-1.0-base", "--depth", 1, "--previews", "-o", tmp_path / "tree.svg")[0] == 0
    groups = node_groups((tmp_path / "tree.svg").read_text())
    assert "<image " in groups["sdxl-1.0-base"] and sum("<image " in g for g in groups.values()) == 1
    # A damaged image is left out with a warning; the tree is still drawn.
    (Path(result["folder"]) / "0.png").write_bytes(b"not a png")
    code, _, err = lmerge("tree", "sdxl-1.0-base", "--depth", 1, "--previews", "-o", tmp_path / "again.svg")
    assert code == 0 and "<image " not in (tmp_path / "again.svg").read_text()
    assert "0.png: not a readable image" in caplog.text


@pytest.mark.parametrize("newest", ["base", "child"])
def test_a_model_with_several_files_is_drawn_from_the_most_recently_seen(lmerge, family, tmp_path, newest):
    from lineage.graph.registry import Registry

    older, newer = (family["child"], family["base"]) if newest == "base" else (family["base"], family["child"])
    for seen, path in enumerate((older, newer)):
        copy = tmp_path / f"{seen}-{os.path.basename(path)}"
        shutil.copy(path, copy)
        assert lmerge("link", copy, "sdxl-1.0-base")[0] == 0
    with Registry() as reg:
        source = previews.preview_source(reg, "sdxl-1.0-base")
    assert source.checkpoint == str(tmp_path / f"1-{os.path.basename(newer)}")


def test_the_progress_label_says_how_long_is_left(lmerge, base, side, monkeypatch):
    import tqdm

    bars = []

    class Bar:
        def __init__(self, total=None, **kwargs):
            self.total, self.n, self.postfixes, self.descriptions = total, 0, [], []
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.postfixes.append(text)

        def set_description(self, text):
            self.descriptions.append(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    code, out, err = lmerge("preview", base, "--prompt", "a", "--prompt", "b", "--size", f"{side}x{side}",
                            "--steps", 2)
    assert code == 0, err
    [bar] = bars
    assert bar.total == bar.n == 4 and bar.descriptions == ["base: image 1/2", "base: image 2/2"]
    assert bar.postfixes[0] == "timing the first steps"
    assert all(re.fullmatch(r"about \d+ s left \([\d.e-]+ s/step\)", p) for p in bar.postfixes[1:]), bar.postfixes
    assert re.search(r"^[\d.e-]+ s per step at \d+x\d+$", out, re.M)


def test_step_timer_counts_loading_steps_and_decoding(monkeypatch):
    """Two images of three steps: 5 s to the first step (4 of loading), 1 s per step, 2 s of decoding."""
    now = [0.0]
    monkeypatch.setattr(previews.time, "monotonic", lambda: now[0])
    timer = StepTimer(images=2, steps=3)
    timer.start_image()
    now[0] = 5.0
    timer.step()
    assert timer.seconds_per_step is None and timer.label() == "timing the first steps"
    now[0] = 6.0
    timer.step()
    assert timer.seconds_per_step == 1.0
    assert timer.seconds_left() == 4 * 1.0 + 1 * 4.0  # 4 steps, the second image's loading; decoding not seen yet
    now[0] = 7.0
    timer.step()
    now[0] = 9.0
    timer.image_done(seconds_per_step=1.0)
    assert timer.seconds_left() == 3 * 1.0 + 4.0 + 2.0
    assert timer.label() == "about 9 s left (1 s/step)"
    assert duration(3725) == "1 h 2 min" and duration(200) == "3 min 20 s"
