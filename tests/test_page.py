"""The family tree as a page (lineage/graph/page.py): the document without a browser, then in a real
headless Chromium driven by selenium (skipped, with the reason, where either is missing)."""
import json
import random
import re
import shutil
import time

import networkx as nx
import pytest

from lineage.graph.catalog import catalog_graph
from lineage.graph.model import add_lineage_edge
from lineage.graph.page import COLLAPSE_ABOVE, page_data, panel, search_text, to_html

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


@pytest.fixture
def family():
    """The catalog plus a user's file under NoobAI V-pred 1.0 and a TIES merge of two catalog models."""
    g = nx.DiGraph(catalog_graph())
    mine = "ab" * 32
    g.add_node(mine, name="my finetune", architecture="sdxl", prediction_type="v", format="sdxl-single-file",
               hashes={"autov3": mine, "sha256": "cd" * 32}, paths=["/models/myFinetune_v10.safetensors"],
               source="user")
    add_lineage_edge(g, "noobai-xl-vpred-1.0", mine, "finetune")
    g.add_node("mix", name="my </script> mix", architecture="sdxl", source="user")
    add_lineage_edge(g, "rouwei-0.8-eps", "mix", "merge", weight=0.3, params={"method": "ties"})
    add_lineage_edge(g, "noobai-xl-eps-1.1", "mix", "merge", weight=0.7, params={"method": "ties"})
    g.add_node("hf:someone/lonely", name="someone/lonely", urls=["https://huggingface.co/someone/lonely"],
               source="hub")
    return g


def big_family(size: int) -> nx.DiGraph:
    """The catalog grown to `size` nodes: generated fine-tunes and (every fifth) two-parent merges."""
    g = nx.DiGraph(catalog_graph())
    rng = random.Random(0)
    nodes = [n for n in g if g.nodes[n].get("architecture") == "sdxl"]
    for i in range(size - g.number_of_nodes()):
        node = f"{i:064x}"
        g.add_node(node, name=f"mix {i}", architecture="sdxl", prediction_type=rng.choice(["epsilon", "v"]),
                   hashes={"autov3": node}, paths=[f"/models/mix_{i}.safetensors"], format="sdxl-single-file",
                   source="user")
        parents = rng.sample(nodes, 2) if i % 5 == 0 else [rng.choice(nodes[-200:])]
        for p in parents:
            merge = len(parents) > 1
            add_lineage_edge(g, p, node, "merge" if merge else "finetune", weight=0.5 if merge else None,
                             params={"method": "ties"} if merge else None)
        nodes.append(node)
    return g


def data_of(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="lineage-data">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))


# ---------------------------------------------------------------- the document


def test_panel_has_what_show_prints(family):
    """The panel's lines are `lmerge show`'s lines (one source: editing.show / show_fields), every one of them."""
    from lineage.graph.edit_commands import show_text
    from lineage.graph.editing import show

    info = panel(family, "ab" * 32)
    facts = dict(info["facts"])
    assert facts["prediction type"] == "v" and facts["sha256"] == "cd" * 32 and facts["origin"] == "user"
    assert facts["path"] == "/models/myFinetune_v10.safetensors" and facts["architecture"] == "sdxl"
    assert info["parents"] == [["noobai-xl-vpred-1.0", "finetune"]]
    assert panel(family, "mix")["parents"] == [["noobai-xl-eps-1.1", "merge, weight 0.7, method TIES"],
                                               ["rouwei-0.8-eps", "merge, weight 0.3, method TIES"]]
    for node in ("ab" * 32, "mix", "noobai-xl-vpred-1.0", "hf:someone/lonely"):
        printed = show_text(show(family, node))
        shown = panel(family, node)
        for caption, text in shown["facts"][2:]:  # after id and origin, which show prints in its first line
            assert f"  {caption}: {text}\n" in printed
        for url in shown["urls"]:
            assert f"  url: {url}\n" in printed
        for parent, how in shown["parents"]:
            assert f"[{parent}] ({how})" in printed or f"{parent} ({how})" in printed
    catalog = panel(family, "noobai-xl-vpred-1.0")
    assert catalog["urls"] and catalog["children"] == ["ab" * 32]
    assert dict(catalog["facts"])["origin"] == "catalog" and "Civitai" in dict(catalog["facts"])
    assert "Laxhar/noobai-XL-Vpred-1.0" in dict(catalog["facts"])["Hugging Face"]


def test_search_text_has_names_repo_ids_file_names_and_hashes(family):
    text = search_text(family, "ab" * 32)
    assert "my finetune" in text and "myfinetune_v10.safetensors" in text and "cd" * 32 in text
    assert "someone/lonely" in search_text(family, "hf:someone/lonely")
    with_repo = family.copy()
    with_repo.nodes["ab" * 32]["repo"] = "me/my-finetune"  # as `lmerge edit --set-repo` stores it
    assert "me/my-finetune" in search_text(with_repo, "ab" * 32)


@needs_dot
def test_page_is_one_self_contained_file(family):
    page = to_html(family, focus="mix")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 1
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing fetched when viewed
    assert "window.lineagePage" in page and "g.node.selected" in page  # our script and stylesheet inline
    data = data_of(page)
    ids = {info["key"]: element for element, info in data["nodes"].items()}
    assert set(ids) == set(family)
    for element in ids.values():
        assert f'id="{element}"' in page  # every node is an SVG element the script finds by id
    assert f'id="{ids["rouwei-0.8-eps"]}_{ids["mix"]}"' in page and "> TIES 0.3<" in page  # edge, labelled
    assert data["focus"] == ids["mix"] and data["nodes"][ids["mix"]]["name"] == "my </script> mix"
    assert {r["key"] for r in data["relations"]} == {"finetune", "merge", "adapter"}
    assert {f["key"] for f in data["families"]} == {"epsilon", "v", "none"}
    assert data["assumed"]["style"] == "dashed" and "no source states" in data["assumed"]["meaning"]
    plain = nx.DiGraph([("a", "b", {"relation": "finetune"})])
    assert page_data(plain, {"a": "n0", "b": "n1"}, None)["assumed"] is None  # the legend line only when drawn
    assert 'xlink:href="https://' not in page  # a click opens the panel (which links the sources)


def test_big_graphs_start_with_deep_subtrees_collapsed(family):
    ids = {node: f"n{i}" for i, node in enumerate(sorted(family))}
    assert page_data(family, ids, None)["collapsed"] == []
    big = big_family(COLLAPSE_ABOVE + 50)
    ids = {node: f"n{i}" for i, node in enumerate(sorted(big))}
    collapsed = page_data(big, ids, None)["collapsed"]
    assert collapsed and all(big.out_degree(next(n for n, i in ids.items() if i == c)) for c in collapsed)


@needs_dot
def test_tree_command_writes_the_page(lmerge, tmp_path):
    code, out, _ = lmerge("tree", "-o", tmp_path / "tree.html")
    assert code == 0 and "wrote" in out
    page = (tmp_path / "tree.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "NoobAI-XL V-pred 1.0" in page


# ---------------------------------------------------------------- in the browser


def chromium():
    """A headless Debian Chromium under selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium chromium-driver; make test does it)")
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def element_of(driver, key: str) -> str:
    return driver.execute_script(
        "const d = JSON.parse(document.getElementById('lineage-data').textContent);"
        "return Object.keys(d.nodes).find((k) => d.nodes[k].key === arguments[0]);", key)


def moved(driver) -> list[str]:
    """The shown nodes the page moved away from where Graphviz put them."""
    return driver.execute_script(
        "return [...document.querySelectorAll('g.node')].filter((g) => !g.classList.contains('hidden') && "
        "(g.getAttribute('transform') || 'translate(0,0)') !== 'translate(0,0)').map((g) => g.id)")


def drawn_height(driver) -> float:
    """The height of the shown models' drawing, in the drawing's own units (whatever the zoom)."""
    return driver.execute_script(
        "const m = document.querySelector('#view svg').getScreenCTM().inverse();"
        "const ys = [...document.querySelectorAll('g.node:not(.hidden)')].flatMap((g) => {"
        "  const r = g.getBoundingClientRect();"
        "  return [new DOMPoint(0, r.top).matrixTransform(m).y, new DOMPoint(0, r.bottom).matrixTransform(m).y]; });"
        "return Math.max(...ys) - Math.min(...ys);")


@needs_dot
def test_in_chromium_search_click_panel_and_screenshot(browser, family, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = tmp_path / "tree.html"
    picture = tmp_path / "preview.png"  # as `lmerge preview` leaves one (tree --previews embeds it)
    Image.new("RGB", (48, 32), (200, 40, 40)).save(picture)
    page.write_text(to_html(family, pictures={"ab" * 32: [str(picture)]}))
    browser.get(page.as_uri())
    assert browser.execute_script("return window.lineagePage.ready") > 0
    browser.find_element(By.ID, "search").send_keys("myFinetune_v10")  # a file name
    results = browser.find_elements(By.CSS_SELECTOR, "#results li")
    assert [r.text.split(" ")[0:2] for r in results] == [["my", "finetune"]]
    results[0].click()
    assert browser.find_element(By.ID, "panel-name").text == "my finetune"
    shown = browser.execute_script("return [...document.querySelectorAll('#panel-previews img')]"
                                   ".map((i) => [i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)])")
    assert shown == [[48, 32, "data:image/png;base64,"]]  # the preview in the panel, from inside the page
    assert "NoobAI-XL V-pred 1.0 (finetune)" in browser.find_element(By.ID, "panel-parents").text
    assert "cd" * 32 in browser.find_element(By.ID, "panel-facts").text
    # Its ancestors up to SDXL 1.0 are highlighted; no descendant.
    highlighted = browser.execute_script("return document.querySelectorAll('g.node.ancestor').length")
    assert highlighted == len(nx.ancestors(family, "ab" * 32))
    browser.save_screenshot(str(tmp_path / "search.png"))

    # A click on a node in the drawing: the panel shows its parents with method and weight; a hash prefix finds it.
    search = browser.find_element(By.ID, "search")
    search.clear()
    search.send_keys("ab" * 4)
    assert browser.find_elements(By.CSS_SELECTOR, "#results li")[0].text.startswith("my finetune")
    search.send_keys(Keys.ESCAPE)  # clears the search and its list
    mix = element_of(browser, "mix")
    browser.execute_script("window.lineagePage.centre(arguments[0])", mix)
    browser.find_element(By.CSS_SELECTOR, f"g#{mix} text").click()
    assert browser.find_element(By.ID, "panel-name").text == "my </script> mix"
    assert "RouWei 0.8 epsilon (merge, weight 0.3, method TIES)" in browser.find_element(By.ID, "panel-parents").text
    assert browser.execute_script("return document.querySelectorAll('g.edge.lit').length") >= 2
    browser.save_screenshot(str(tmp_path / "click.png"))
    assert (tmp_path / "click.png").read_bytes()[:4] == b"\x89PNG"


@needs_dot
def test_in_chromium_filters_collapse_and_sources(browser, family, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "tree.html"
    page.write_text(to_html(family))
    browser.get(page.as_uri())
    shown = lambda: browser.execute_script("return window.lineagePage.visible()")  # noqa: E731
    assert shown() == family.number_of_nodes()
    browser.find_element(By.ID, "filter-merge").click()  # merge relations off: the merges disappear
    without_merges = nx.DiGraph([(p, c) for p, c, r in family.edges(data="relation") if r != "merge"])
    roots = [n for n in family if family.in_degree(n) == 0]
    reached = set(roots).union(*(nx.descendants(without_merges, r) for r in roots if r in without_merges))
    assert shown() == len(reached) < family.number_of_nodes()
    assert "hidden" in browser.find_element(By.ID, element_of(browser, "mix")).get_attribute("class")
    browser.find_element(By.ID, "filter-merge").click()
    browser.find_element(By.ID, "filter-v").click()  # v-pred models off (their children stay)
    v_models = sum(family.nodes[n].get("prediction_type") == "v" for n in family)
    assert shown() == family.number_of_nodes() - v_models
    browser.find_element(By.ID, "filter-v").click()
    browser.execute_script("window.lineagePage.select(arguments[0])", element_of(browser, "noobai-xl-eps-1.0"))
    browser.find_element(By.ID, "collapse").click()
    below = nx.descendants(family, "noobai-xl-eps-1.0") - nx.descendants(family, "rouwei-0.8-eps")
    assert shown() == family.number_of_nodes() - len(below)
    assert browser.find_element(By.CSS_SELECTOR, "text.badge").text == f"+{len(below)}"
    browser.find_element(By.ID, "collapse").click()
    assert shown() == family.number_of_nodes()
    assert moved(browser) == []  # everything shown: Graphviz's own layout, untouched
    # Collapsing the whole SDXL family leaves no hole: the shown models and the cluster frame close up.
    before = drawn_height(browser)
    browser.execute_script("window.lineagePage.select(arguments[0])", element_of(browser, "sdxl-1.0-base"))
    browser.find_element(By.ID, "collapse").click()
    assert drawn_height(browser) < 0.7 * before and moved(browser)
    frame = browser.execute_script("return document.querySelector('g.cluster path').getBoundingClientRect().height")
    node = browser.execute_script("return document.getElementById(arguments[0]).getBoundingClientRect().height",
                                  element_of(browser, "sdxl-1.0-base"))
    assert frame < 3 * node  # the SDXL frame holds just its one shown model now
    browser.save_screenshot(str(tmp_path / "collapsed.png"))
    browser.find_element(By.ID, "collapse").click()
    assert moved(browser) == []
    browser.execute_script("window.lineagePage.select(arguments[0])", element_of(browser, "noobai-xl-eps-1.0"))
    links = browser.find_elements(By.CSS_SELECTOR, "#panel-urls a")
    assert [a.get_attribute("href") for a in links] == family.nodes["noobai-xl-eps-1.0"]["urls"]
    legend = browser.find_element(By.ID, "legend").text
    assert "merge: the child mixes several parents" in legend and "v-prediction" in legend
    assert "assumed: no source states this relation" in legend


def view_box(driver) -> list[float]:
    """The drawing's visible box (x, y, width, height): what pan and zoom change."""
    return [float(v) for v in driver.execute_script(
        "return document.querySelector('#view svg').getAttribute('viewBox')").split()]


def keys_with_class(driver, name: str) -> set[str]:
    """The node keys (ids in the graph) of the drawn models carrying CSS class `name`."""
    return set(driver.execute_script(
        "const d = JSON.parse(document.getElementById('lineage-data').textContent);"
        "return [...document.querySelectorAll('g.node.' + arguments[0])].map((g) => d.nodes[g.id].key);", name))


@needs_dot
def test_in_chromium_pan_zoom_and_a_clicked_node_lights_its_lineage(browser, family, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By

    page = tmp_path / "tree.html"
    page.write_text(to_html(family))
    browser.get(page.as_uri())
    view = browser.find_element(By.ID, "view")
    start = view_box(browser)
    browser.find_element(By.ID, "zoom-in").click()  # the buttons: a smaller box is a closer look
    zoomed = view_box(browser)
    assert zoomed[2] == pytest.approx(start[2] / 1.4) and zoomed[3] == pytest.approx(start[3] / 1.4)
    browser.find_element(By.ID, "zoom-out").click()
    assert view_box(browser)[2] == pytest.approx(start[2])
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(view), 0, -300).perform()  # the wheel
    wheeled = view_box(browser)
    assert wheeled[2] < start[2]
    ActionChains(browser).move_to_element(view).click_and_hold().move_by_offset(150, 80).release().perform()
    panned = view_box(browser)  # dragging the drawing right and down shows what lies left and above
    assert panned[0] < wheeled[0] and panned[1] < wheeled[1] and panned[2] == pytest.approx(wheeled[2])

    node = "noobai-xl-eps-1.1"  # parents above it (Illustrious, NoobAI) and children below (RouWei, our mix)
    browser.execute_script("window.lineagePage.centre(arguments[0])", element_of(browser, node))
    browser.find_element(By.CSS_SELECTOR, f"g#{element_of(browser, node)} text").click()
    assert keys_with_class(browser, "selected") == {node}
    assert keys_with_class(browser, "ancestor") == nx.ancestors(family, node)
    assert keys_with_class(browser, "descendant") == nx.descendants(family, node)
    assert nx.ancestors(family, node) and "mix" in nx.descendants(family, node)
    browser.save_screenshot(str(tmp_path / "lineage.png"))


@needs_dot
@pytest.mark.slow
def test_in_chromium_2000_nodes_load_and_search(browser, tmp_path):
    big = big_family(2000)
    page = tmp_path / "big.html"
    started = time.perf_counter()
    page.write_text(to_html(big))
    written = time.perf_counter() - started
    browser.get(page.as_uri())
    ready_ms = browser.execute_script("return window.lineagePage.ready")
    print(f"2,000 nodes: page written in {written:.1f} s, ready in the browser {ready_ms:.0f} ms")
    assert ready_ms < 10_000
    from selenium.webdriver.common.by import By

    assert browser.execute_script("return window.lineagePage.visible()") < 2000  # deep subtrees start collapsed
    browser.find_element(By.ID, "search").send_keys("mix_1900.safetensors")
    browser.find_elements(By.CSS_SELECTOR, "#results li")[0].click()  # a collapsed one unfolds when chosen
    assert browser.find_element(By.ID, "panel-name").text == "mix 1900"
    browser.save_screenshot(str(tmp_path / "big.png"))
