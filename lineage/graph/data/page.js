// The family-tree page's script (lineage/graph/page.py writes it into the page).
// The layout is Graphviz's SVG, already in the page; this script adds pan and zoom, search, the node
// panel, highlighted ancestors and descendants, filters, the legend and collapsible subtrees.
// Node and edge elements carry the ids page.py gave them: node "n12", edge "n3_n12".
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("lineage-data").textContent);
  const view = document.getElementById("view");
  const svg = view.querySelector("svg");
  const nodeIds = Object.keys(data.nodes);
  const element = {};  // node or edge id -> its <g>
  for (const id of nodeIds) element[id] = document.getElementById(id);
  for (const edge of data.edges) element[edge.id] = document.getElementById(edge.id);
  const parentsOf = {};  // node id -> [[parent id, edge]]
  const childrenOf = {};  // node id -> [[child id, edge]]
  for (const id of nodeIds) { parentsOf[id] = []; childrenOf[id] = []; }
  for (const edge of data.edges) {
    parentsOf[edge.to].push([edge.from, edge]);
    childrenOf[edge.from].push([edge.to, edge]);
  }
  const collapsed = new Set(data.collapsed);
  const shownRelations = new Set(data.relations.map((r) => r.key));
  const shownFamilies = new Set(data.families.map((f) => f.key));
  let visible = new Set(nodeIds);
  let selected = null;

  // ------------------------------------------------------------------ pan and zoom (the viewBox)
  svg.removeAttribute("width");
  svg.removeAttribute("height");
  const full = svg.viewBox.baseVal;
  const whole = { x: full.x, y: full.y, w: full.width, h: full.height };
  let box = { ...whole };

  function show(b) {
    // Keep the box's shape that of the view, so that screen and drawing scale alike in x and y.
    const r = view.getBoundingClientRect();
    const aspect = r.height / Math.max(r.width, 1);
    if (b.h / b.w > aspect) { const w = b.h / aspect; b = { x: b.x - (w - b.w) / 2, y: b.y, w, h: b.h }; }
    else { const h = b.w * aspect; b = { x: b.x, y: b.y - (h - b.h) / 2, w: b.w, h }; }
    box = b;
    svg.setAttribute("viewBox", `${b.x} ${b.y} ${b.w} ${b.h}`);
  }

  function toDrawing(clientX, clientY) {
    const r = view.getBoundingClientRect();
    return { x: box.x + (clientX - r.left) / r.width * box.w, y: box.y + (clientY - r.top) / r.height * box.h };
  }

  function zoom(factor, at) {
    const p = at || { x: box.x + box.w / 2, y: box.y + box.h / 2 };
    const w = Math.min(Math.max(box.w * factor, 20), whole.w * 20);
    const f = w / box.w;
    show({ x: p.x - (p.x - box.x) * f, y: p.y - (p.y - box.y) * f, w, h: box.h * f });
  }

  function boundsOf(ids) {  // the drawing's box around these nodes
    const m = svg.getScreenCTM().inverse();
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const id of ids) {
      const el = element[id];
      if (!el || el.classList.contains("hidden")) continue;
      const r = el.getBoundingClientRect();
      for (const [cx, cy] of [[r.left, r.top], [r.right, r.bottom]]) {
        const p = new DOMPoint(cx, cy).matrixTransform(m);
        x0 = Math.min(x0, p.x); y0 = Math.min(y0, p.y); x1 = Math.max(x1, p.x); y1 = Math.max(y1, p.y);
      }
    }
    return x0 === Infinity ? null : { x: x0, y: y0, w: x1 - x0, h: y1 - y0 };
  }

  function fit(ids) {
    const b = boundsOf(ids || nodeIds);
    if (!b) return show({ ...whole });
    const pad = Math.max(b.w, b.h) * 0.05 + 20;
    show({ x: b.x - pad, y: b.y - pad, w: b.w + 2 * pad, h: b.h + 2 * pad });
  }

  function centre(id) {
    const b = boundsOf([id]);
    if (!b) return;
    const w = Math.min(box.w, Math.max(b.w * 4, 600));
    show({ x: b.x + b.w / 2 - w / 2, y: b.y + b.h / 2 - (box.h * w / box.w) / 2, w, h: box.h * w / box.w });
  }

  let drag = null;
  view.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY, box: { ...box }, moved: false }; });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const r = view.getBoundingClientRect();
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    if (drag.moved) {
      show({ ...drag.box, x: drag.box.x - dx / r.width * drag.box.w, y: drag.box.y - dy / r.height * drag.box.h });
    }
  });
  window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); });
  view.addEventListener("wheel", (e) => {
    e.preventDefault();
    zoom(Math.exp(e.deltaY * 0.0015), toDrawing(e.clientX, e.clientY));
  }, { passive: false });
  document.getElementById("zoom-in").onclick = () => zoom(1 / 1.4);
  document.getElementById("zoom-out").onclick = () => zoom(1.4);
  document.getElementById("fit").onclick = () => fit([...visible]);
  window.addEventListener("resize", () => show(box));

  // ------------------------------------------------------------------ visibility: collapse and filters
  function hiddenBelow(id) {  // how many descendants a collapsed node hides
    const seen = new Set();
    const stack = [id];
    while (stack.length) for (const [c] of childrenOf[stack.pop()]) if (!seen.has(c)) { seen.add(c); stack.push(c); }
    return [...seen].filter((c) => !visible.has(c)).length;
  }

  function updateVisibility() {
    // Shown: reached from a root along relations that are shown, never through a collapsed node,
    // and of a prediction type that is shown (a hidden type hides the node, not its children).
    const reached = new Set();
    const stack = nodeIds.filter((id) => parentsOf[id].length === 0);
    stack.forEach((id) => reached.add(id));
    while (stack.length) {
      const id = stack.pop();
      if (collapsed.has(id)) continue;
      for (const [c, edge] of childrenOf[id]) {
        if (shownRelations.has(edge.relation) && !reached.has(c)) { reached.add(c); stack.push(c); }
      }
    }
    visible = new Set(nodeIds.filter((id) => reached.has(id) && shownFamilies.has(data.nodes[id].family)));
    for (const id of nodeIds) {
      const el = element[id];
      el.classList.toggle("hidden", !visible.has(id));
      el.classList.toggle("collapsed", collapsed.has(id) && visible.has(id));
      const badge = el.querySelector(".badge");
      if (badge) badge.remove();
    }
    for (const edge of data.edges) {
      element[edge.id].classList.toggle("hidden",
        !(visible.has(edge.from) && visible.has(edge.to) && shownRelations.has(edge.relation)));
    }
    compact();
    for (const id of collapsed) if (visible.has(id)) addBadge(id, hiddenBelow(id));
    document.getElementById("count").textContent =
      `${visible.size} of ${nodeIds.length} models shown, ${data.edges.length} relations`;
  }

  // ------------------------------------------------------------------ compaction: no holes where nodes hide
  // Graphviz laid out every node; hiding some (a collapsed subtree, a filter) would leave holes. So the
  // drawing is compacted along both axes: a band of the drawing with no shown node across it (a column
  // in x, a row in y) wider than the gaps Graphviz itself left between nodes (at most MAX_GAP) shrinks
  // to that gap, and every point — node, edge, arrowhead, label, cluster box — moves with the band it
  // lies in. With everything shown the map is the identity: Graphviz's own layout.
  const MIN_GAP = 18, MAX_GAP = 120;
  const nodeBox = {};
  for (const id of nodeIds) nodeBox[id] = element[id].getBBox();
  const written = new Map();  // element -> {attribute: value as Graphviz wrote it}

  function bandsOf(intervals, gap) {  // [from, to] intervals merged where less than `gap` apart
    const bands = [];
    for (const [a, b] of intervals.sort((p, q) => p[0] - q[0])) {
      const last = bands[bands.length - 1];
      if (last && a <= last[1] + gap) last[1] = Math.max(last[1], b); else bands.push([a, b]);
    }
    return bands;
  }
  function layoutGap(axis, size) {  // the widest gap between nodes in Graphviz's layout, within bounds
    const bands = bandsOf(nodeIds.map((id) => [nodeBox[id][axis], nodeBox[id][axis] + nodeBox[id][size]]), 0);
    let widest = MIN_GAP;
    for (let i = 1; i < bands.length; i++) widest = Math.max(widest, bands[i][0] - bands[i - 1][1]);
    return Math.min(widest, MAX_GAP);
  }
  const GAP = { x: layoutGap("x", "width"), y: layoutGap("y", "height") };

  function axisMap(intervals, gap) {  // occupied [from, to] intervals of one axis -> a monotone map of that axis
    const bands = bandsOf(intervals, gap);
    const removed = [0];
    for (let i = 1; i < bands.length; i++) removed.push(removed[i - 1] + bands[i][0] - bands[i - 1][1] - gap);
    return (v) => {
      let lo = 0, hi = bands.length - 1;  // the last band starting at or before v
      if (hi < 0 || v < bands[0][0]) return v;
      while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (bands[mid][0] <= v) lo = mid; else hi = mid - 1; }
      const [, end] = bands[lo];
      if (v <= end || lo === bands.length - 1) return v - removed[lo];
      return end - removed[lo] + (v - end) / (bands[lo + 1][0] - end) * gap;  // inside a hole: squeezed
    };
  }

  const NUMBER_PAIR = /(-?\d*\.?\d+(?:e-?\d+)?),(-?\d*\.?\d+(?:e-?\d+)?)/g;
  function moveShapes(group, fx, fy) {  // every coordinate in an edge's or cluster's shapes, through the maps
    for (const shape of group.querySelectorAll("path, polygon, polyline, text")) {
      if (!written.has(shape)) {
        written.set(shape, Object.fromEntries(["d", "points", "x", "y"].filter((a) => shape.hasAttribute(a))
          .map((a) => [a, shape.getAttribute(a)])));
      }
      const was = written.get(shape);
      const pairs = (text) => text.replace(NUMBER_PAIR, (_, x, y) => `${fx(+x)},${fy(+y)}`);
      if (was.d) shape.setAttribute("d", pairs(was.d));
      if (was.points) shape.setAttribute("points", pairs(was.points));
      if (was.x) shape.setAttribute("x", fx(+was.x));
      if (was.y) shape.setAttribute("y", fy(+was.y));
    }
  }

  // A cluster's frame (SDXL, SD 1.x, ...) is redrawn around its shown models, with Graphviz's margins.
  function boxAround(boxes) {
    const x0 = Math.min(...boxes.map((b) => b.x)), y0 = Math.min(...boxes.map((b) => b.y));
    const x1 = Math.max(...boxes.map((b) => b.x + b.width)), y1 = Math.max(...boxes.map((b) => b.y + b.height));
    return { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
  }
  const clusters = [...svg.querySelectorAll("g.cluster")].map((g) => {
    const frame = g.querySelector("path, polygon"), label = g.querySelector("text");
    const b = frame.getBBox();
    const members = nodeIds.filter((id) => {
      const n = nodeBox[id], cx = n.x + n.width / 2, cy = n.y + n.height / 2;
      return cx > b.x && cx < b.x + b.width && cy > b.y && cy < b.y + b.height;
    });
    const inner = members.length ? boxAround(members.map((id) => nodeBox[id])) : b;
    frame.setAttribute("vector-effect", "non-scaling-stroke");
    return { g, frame, label, b, members, margin: [inner.x - b.x, inner.y - b.y, b.x + b.width - inner.x - inner.width,
                                                  b.y + b.height - inner.y - inner.height] };
  });

  function compact() {
    const shown = [...visible].map((id) => nodeBox[id]);
    const fx = axisMap(shown.map((b) => [b.x, b.x + b.width]), GAP.x);
    const fy = axisMap(shown.map((b) => [b.y, b.y + b.height]), GAP.y);
    for (const id of nodeIds) {
      const b = nodeBox[id], cx = b.x + b.width / 2, cy = b.y + b.height / 2;
      element[id].setAttribute("transform", `translate(${fx(cx) - cx},${fy(cy) - cy})`);
    }
    for (const edge of data.edges) moveShapes(element[edge.id], fx, fy);
    for (const c of clusters) {
      const shown = c.members.filter((id) => visible.has(id));
      c.g.classList.toggle("hidden", !shown.length);
      if (!shown.length) continue;
      const moved = boxAround(shown.map((id) => {
        const b = nodeBox[id];
        return { x: fx(b.x + b.width / 2) - b.width / 2, y: fy(b.y + b.height / 2) - b.height / 2,
                 width: b.width, height: b.height };
      }));
      const [left, top, right, bottom] = c.margin;
      const x = moved.x - left, y = moved.y - top, w = moved.width + left + right, h = moved.height + top + bottom;
      c.frame.setAttribute("transform",
        `translate(${x},${y}) scale(${w / c.b.width},${h / c.b.height}) translate(${-c.b.x},${-c.b.y})`);
      if (c.label) c.label.setAttribute("transform", `translate(${x + w / 2 - (c.b.x + c.b.width / 2)},${y - c.b.y})`);
    }
  }

  function addBadge(id, count) {
    if (!count) return;
    const shape = element[id].querySelector("path, polygon, ellipse");
    const b = shape.getBBox();
    const text = document.createElementNS("http://www.w3.org/2000/svg", "text");
    text.setAttribute("class", "badge");
    text.setAttribute("x", b.x + b.width + 3);
    text.setAttribute("y", b.y + b.height);
    text.textContent = `+${count}`;
    element[id].appendChild(text);
  }

  function reveal(id) {  // unfold what hides a node the user asked for
    const up = [id];
    const seen = new Set(up);
    while (up.length) {
      for (const [p] of parentsOf[up.pop()]) if (!seen.has(p)) { seen.add(p); up.push(p); collapsed.delete(p); }
    }
    shownFamilies.add(data.nodes[id].family);
    syncFilterBoxes();
    updateVisibility();
  }

  // ------------------------------------------------------------------ selection and the panel
  function lineage(id, next) {  // every node reached from id by `next` (parentsOf or childrenOf)
    const found = new Set();
    const stack = [id];
    while (stack.length) for (const [n] of next[stack.pop()]) if (!found.has(n)) { found.add(n); stack.push(n); }
    return found;
  }

  function select(id) {
    for (const el of view.querySelectorAll(".selected, .ancestor, .descendant, .lit")) {
      el.classList.remove("selected", "ancestor", "descendant", "lit");
    }
    selected = id;
    view.classList.toggle("has-selection", id !== null);
    const panelEl = document.getElementById("panel");
    if (id === null) { panelEl.hidden = true; return; }
    if (!visible.has(id)) reveal(id);
    const up = lineage(id, parentsOf), down = lineage(id, childrenOf);
    element[id].classList.add("selected");
    up.forEach((n) => element[n].classList.add("ancestor"));
    down.forEach((n) => element[n].classList.add("descendant"));
    for (const edge of data.edges) {
      const upward = up.has(edge.from) && (up.has(edge.to) || edge.to === id);
      const downward = down.has(edge.to) && (down.has(edge.from) || edge.from === id);
      if (upward || downward) element[edge.id].classList.add("lit");
    }
    renderPanel(id, up.size, down.size);
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    Object.assign(e, attrs || {});
    for (const c of children) e.append(c);
    return e;
  }

  function nodeLink(id, note) {
    const a = el("a", { href: "#", className: "node-link", textContent: data.nodes[id].name });
    a.dataset.node = id;
    a.onclick = (e) => { e.preventDefault(); select(id); centre(id); };
    return note ? el("li", {}, a, ` (${note})`) : el("li", {}, a);
  }

  function renderPanel(id, ancestors, descendants) {
    const node = data.nodes[id];
    const panelEl = document.getElementById("panel");
    panelEl.replaceChildren();
    panelEl.append(el("button", { id: "close", title: "close", textContent: "×", onclick: () => select(null) }));
    panelEl.append(el("h2", { id: "panel-name", textContent: node.name }));
    if (node.previews) {  // lmerge preview's images, embedded in the page (lmerge tree --previews)
      panelEl.append(el("div", { id: "panel-previews" }, ...node.previews.map((src, i) =>
        el("img", { src, alt: `preview ${i + 1} of ${node.name}` }))));
    }
    const table = el("table", { id: "panel-facts" });
    for (const [caption, value] of node.facts) {
      table.append(el("tr", {}, el("th", { textContent: caption }), el("td", { textContent: value })));
    }
    panelEl.append(table);
    if (node.urls.length) {
      panelEl.append(el("h3", { textContent: "Sources" }));
      panelEl.append(el("ul", { id: "panel-urls" }, ...node.urls.map((u) =>
        el("li", {}, el("a", { href: u, target: "_blank", rel: "noopener", textContent: u })))));
    }
    panelEl.append(el("h3", { textContent: `Parents (${ancestors} ancestors)` }));
    panelEl.append(el("ul", { id: "panel-parents" }, ...node.parents.map(([p, how]) => nodeLink(p, how))));
    panelEl.append(el("h3", { textContent: `Children (${descendants} descendants)` }));
    panelEl.append(el("ul", { id: "panel-children" }, ...node.children.map((c) => nodeLink(c))));
    if (node.children.length) {
      const folded = collapsed.has(id);
      panelEl.append(el("button", {
        id: "collapse", textContent: folded ? "Expand subtree" : "Collapse subtree",
        onclick: () => {
          folded ? collapsed.delete(id) : collapsed.add(id);
          updateVisibility();
          select(id);
          centre(id);  // the drawing was compacted around what is shown: keep the node in view
        },
      }));
    }
    panelEl.hidden = false;
  }

  view.addEventListener("click", (e) => {
    if (drag && drag.moved) return;
    const g = e.target.closest("g.node");
    select(g && data.nodes[g.id] ? g.id : null);
  });

  // ------------------------------------------------------------------ search
  const search = document.getElementById("search");
  const results = document.getElementById("results");

  function matches(query) {
    const words = query.toLowerCase().split(/\s+/).filter(Boolean);
    if (!words.length) return [];
    const found = nodeIds.filter((id) => words.every((w) => data.nodes[id].search.includes(w)));
    const q = words.join(" ");
    const rank = (id) => (data.nodes[id].name.toLowerCase() === q ? 0 : data.nodes[id].name.toLowerCase().startsWith(q) ? 1 : 2);
    return found.sort((a, b) => rank(a) - rank(b) || data.nodes[a].name.localeCompare(data.nodes[b].name));
  }

  function choose(id) {
    results.replaceChildren();
    select(id);
    centre(id);
  }

  search.addEventListener("input", () => {
    for (const m of view.querySelectorAll("g.match")) m.classList.remove("match");
    const found = matches(search.value);
    found.forEach((id) => element[id].classList.add("match"));
    results.replaceChildren(...found.slice(0, 30).map((id) => {
      const li = el("li", { textContent: data.nodes[id].name });
      li.append(el("small", { textContent: " " + data.nodes[id].key.slice(0, 24) }));
      li.dataset.node = id;
      li.onclick = () => choose(id);
      return li;
    }));
    if (found.length > 30) results.append(el("li", { className: "more", textContent: `… ${found.length - 30} more` }));
  });
  search.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { const first = matches(search.value)[0]; if (first) choose(first); }
    if (e.key === "Escape") { search.value = ""; search.dispatchEvent(new Event("input")); }
  });

  // ------------------------------------------------------------------ filters and legend
  const boxes = [];
  function filterBox(set, key, label, swatch) {
    const input = el("input", { type: "checkbox", checked: set.has(key), id: `filter-${key}` });
    input.onchange = () => { input.checked ? set.add(key) : set.delete(key); updateVisibility(); };
    boxes.push([input, set, key]);
    return el("label", {}, input, swatch, label);
  }
  function syncFilterBoxes() { for (const [input, set, key] of boxes) input.checked = set.has(key); }

  function relationSwatch(r) {
    const dash = { dashed: "6,4", dotted: "2,3" }[r.style] || "";
    const s = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    s.setAttribute("class", "swatch-line");
    s.setAttribute("viewBox", "0 0 30 10");
    s.innerHTML = `<line x1="0" y1="5" x2="30" y2="5" stroke="${r.colour}" stroke-width="${r.style === "bold" ? 3 : 1.6}" stroke-dasharray="${dash}"/>`;
    return s;
  }
  function familySwatch(f) {
    return el("span", { className: "swatch", style: `background:${f.fill};border-color:${f.border}` });
  }

  const relationFilters = document.getElementById("relation-filters");
  for (const r of data.relations) relationFilters.append(filterBox(shownRelations, r.key, r.key, relationSwatch(r)));
  const familyFilters = document.getElementById("family-filters");
  for (const f of data.families) familyFilters.append(filterBox(shownFamilies, f.key, f.title, familySwatch(f)));

  const legend = document.getElementById("legend");
  const items = el("dl", {});
  for (const f of data.families) items.append(el("dt", {}, familySwatch(f)), el("dd", { textContent: f.title }));
  for (const r of data.relations) items.append(el("dt", {}, relationSwatch(r)), el("dd", { textContent: `${r.key}: ${r.meaning}` }));
  if (data.assumed) items.append(el("dt", {}, relationSwatch(data.assumed)), el("dd", { textContent: data.assumed.meaning }));
  for (const [mark, meaning] of [
    ["bold border", "a file you have (its AutoV3 in the box)"], ["ellipse", "an adapter (LoRA, LoKr, ...)"],
    ["dashed box", "named in metadata, not seen yet"], ["+N", "a collapsed subtree: N models hidden below"],
    ["edge label", "merge method and this parent's weight"],
  ]) items.append(el("dt", { textContent: mark }), el("dd", { textContent: meaning }));
  legend.append(items);

  // ------------------------------------------------------------------ start
  updateVisibility();
  if (data.focus) { select(data.focus); centre(data.focus); } else fit([...visible]);
  // For tests and the curious: what the page did, and when it was ready.
  window.lineagePage = { select, fit, centre, visible: () => visible.size, ready: performance.now() };
})();
