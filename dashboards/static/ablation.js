/* One ablation: the progress bar, and one panel per cell (its knob values, its runs, its
   verdict against the baseline cell with reasons and axes, or why there is none yet), built
   from the data dashboard.js fetched; the forest plot is dashboard.js's. Every string is
   placed with textContent. */
(function () {
  "use strict";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = text; }
    return e;
  }

  function tableIn(parent, heading, spec) {
    var box = el("div");
    box.appendChild(el("h3", null, heading));
    var holder = el("div", "table-wrap");
    box.appendChild(holder);
    window.GoodputPage.table(holder, spec);
    parent.appendChild(box);
  }

  function panel(view) {
    var p = el("section", "panel cell");
    p.dataset.cell = view.cell;
    var h = el("h2");
    h.appendChild(el("span", "name", view.cell));
    if (view.baseline) {
      h.appendChild(el("span", "badge big badge-baseline", "baseline"));
    } else if (view.verdict) {
      var b = el("span", "badge big verdict-badge badge-" + view.verdict.verdict, view.verdict.verdict);
      b.title = view.verdict.meaning;
      h.appendChild(b);
    } else {
      h.appendChild(el("span", "badge big verdict-badge badge-nodata", "no verdict yet"));
    }
    if (view.compare_href) {
      var a = el("a", "compare-link", "open in compare \u2192");
      a.href = view.compare_href;
      a.style.fontSize = "0.85rem";
      a.style.fontWeight = "400";
      h.appendChild(a);
    }
    p.appendChild(h);
    p.appendChild(el("p", "values", view.values + " \u00b7 " + view.progress));
    if (view.verdict) {
      var v = view.verdict;
      p.appendChild(el("p", "meaning", v.verdict + ": " + v.meaning + " (" + v.runs + ")"));
      var ul = el("ul", "reasons");
      v.reasons.forEach(function (r) { ul.appendChild(el("li", null, r)); });
      p.appendChild(ul);
    } else if (view.refusal) {
      var r = el("div", "refusal");
      r.appendChild(el("strong", null, view.refusal.title));
      r.appendChild(el("span", null, view.refusal.message));
      p.appendChild(r);
    } else if (view.baseline) {
      p.appendChild(el("p", "meaning", "every other cell is judged against this one"));
    }
    var cols = el("div", "cols");
    tableIn(cols, "runs", view.runs);
    if (view.verdict) { tableIn(cols, "axes, against the baseline cell", view.verdict.axes); }
    p.appendChild(cols);
    return p;
  }

  window.GoodputPage.onData(function (data) {
    var bar = document.getElementById("progress");
    bar.max = data.progress.of;
    bar.value = data.progress.ended;
    document.getElementById("no-runs").hidden = !!data.any_runs;
    var cells = document.getElementById("cells");
    cells.replaceChildren.apply(cells, (data.cells || []).map(panel));
  });
}());
