/* The pages' one script: fetch the page's data (figures, tables, texts) from its data URL,
   draw it, and fetch again every few seconds while the run (or a run of the list) is live.
   Every string is placed with textContent or as a Plotly text, never as markup. */
(function () {
  "use strict";
  var body = document.body;
  var hooks = [];
  var timer = null;
  var draws = 0;
  var CONFIG = {responsive: true, displaylogo: false};

  function setStatus(text) {
    var el = document.getElementById("status");
    if (el) { el.textContent = text; }
  }

  function cellText(v) {
    if (v === null || v === undefined) { return "\u2013"; }
    if (Array.isArray(v)) { return v.map(cellText).join(" \u00b7 "); }
    if (typeof v === "object") { return cellText(v.text); }
    return String(v);
  }

  function sortKey(v) {
    if (Array.isArray(v)) { return null; }
    if (v !== null && typeof v === "object") {
      return v.sort !== undefined ? v.sort : sortKey(v.text);
    }
    return v === undefined ? null : v;
  }

  function compare(a, b) {
    if (a === b) { return 0; }
    if (a === null) { return 1; }   // blanks last, whichever way
    if (b === null) { return -1; }
    if (typeof a === "number" && typeof b === "number") { return a - b; }
    return String(a).localeCompare(String(b));
  }

  /* spec: {columns: [{label, num, help}], rows: [[cell...]], empty, flags: [bool], select,
     sortable}. cell: a string, a number, null, {text, href, title, sort}, {text, badge,
     title, sort} (the text as a badge: class badge-<badge>), or a list of {text, href,
     title} (several links in one cell). */
  function table(el, spec) {
    var state = el._sort || null;
    var rows = spec.rows.map(function (r, i) { return {cells: r, flag: spec.flags && spec.flags[i], i: i}; });
    if (state) {
      rows.sort(function (a, b) {
        var c = compare(sortKey(a.cells[state.col]), sortKey(b.cells[state.col]));
        if (a.cells[state.col] === null || b.cells[state.col] === null) { return c; }
        return state.dir === "ascending" ? c : -c;
      });
    }
    var t = document.createElement("table");
    t.className = "data";
    var thead = t.createTHead().insertRow();
    if (spec.select) { thead.appendChild(document.createElement("th")).textContent = "compare"; }
    spec.columns.forEach(function (col, ci) {
      var th = document.createElement("th");
      th.textContent = col.label;
      th.scope = "col";
      if (col.help) { th.title = col.help; }
      if (spec.sortable) {
        th.className = "sortable";
        th.tabIndex = 0;
        if (state && state.col === ci) { th.setAttribute("aria-sort", state.dir); }
        var resort = function () {
          var dir = state && state.col === ci && state.dir === "ascending" ? "descending" : "ascending";
          el._sort = {col: ci, dir: dir};
          table(el, spec);
        };
        th.addEventListener("click", resort);
        th.addEventListener("keydown", function (e) { if (e.key === "Enter") { resort(); } });
      }
      thead.appendChild(th);
    });
    var tbody = t.createTBody();
    if (!rows.length) {
      var td = tbody.insertRow().insertCell();
      td.colSpan = spec.columns.length + (spec.select ? 1 : 0);
      td.className = "empty-row";
      td.textContent = spec.empty || "nothing to show";
    }
    var chosen = el._chosen || {};
    rows.forEach(function (r) {
      var tr = tbody.insertRow();
      if (r.flag) { tr.className = "flag"; }
      if (spec.select) {
        var box = document.createElement("input");
        box.type = "checkbox";
        box.value = spec.select[r.i];
        box.checked = !!chosen[box.value];
        box.setAttribute("aria-label", "select for compare");
        box.addEventListener("change", function () {
          chosen[box.value] = box.checked;
          el._chosen = chosen;
          el.dispatchEvent(new CustomEvent("selection"));
        });
        tr.insertCell().appendChild(box);
      }
      r.cells.forEach(function (v, ci) {
        var td = tr.insertCell();
        if (spec.columns[ci].num) { td.className = "num"; }
        if (Array.isArray(v)) {
          v.forEach(function (link, li) {
            if (li) { td.appendChild(document.createTextNode(" \u00b7 ")); }
            var a = document.createElement("a");
            a.href = link.href;
            a.textContent = cellText(link);
            if (link.title) { a.title = link.title; }
            td.appendChild(a);
          });
        } else if (v !== null && typeof v === "object" && v.href) {
          var a = document.createElement("a");
          a.href = v.href;
          a.textContent = cellText(v);
          td.appendChild(a);
        } else if (v !== null && typeof v === "object" && v.badge) {
          var badge = document.createElement("span");
          badge.className = "badge badge-" + String(v.badge).replace(/[^a-z0-9_-]/gi, "");
          badge.textContent = cellText(v);
          td.appendChild(badge);
        } else {
          td.textContent = cellText(v);
        }
        if (v !== null && typeof v === "object" && v.title) { td.title = v.title; }
      });
    });
    el._chosen = chosen;
    el.replaceChildren(t);
  }

  function selected(el) {
    var chosen = el._chosen || {};
    return Object.keys(chosen).filter(function (k) { return chosen[k]; });
  }

  function draw(data) {
    var figures = data.figures || {};
    var pending = Object.keys(figures).map(function (id) {
      var el = document.getElementById(id);
      if (!el) { return null; }
      var fig = figures[id];
      return Plotly.react(el, fig.data, fig.layout, CONFIG);
    });
    Object.keys(data.tables || {}).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) { table(el, data.tables[id]); }
    });
    Object.keys(data.texts || {}).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) { el.textContent = data.texts[id]; }
    });
    if (data.status) {
      var badge = document.getElementById("run-status");
      if (badge) { badge.textContent = data.status; badge.className = "badge badge-" + data.status; }
    }
    hooks.forEach(function (h) { h(data); });
    return Promise.all(pending);
  }

  function load(url, refreshS) {
    if (timer) { clearTimeout(timer); timer = null; }
    return fetch(url, {headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (!r.ok) {
          return r.json().catch(function () { return {}; }).then(function (b) {
            var detail = typeof b.detail === "string" ? b.detail : ("HTTP " + r.status);
            throw new Error(detail);
          });
        }
        return r.json();
      })
      .then(function (data) {
        return draw(data).then(function () { return data; });
      })
      .then(function (data) {
        draws += 1;
        body.dataset.draws = String(draws);
        body.dataset.ready = "1";
        body.dataset.live = data.live ? "1" : "0";
        var when = "updated " + new Date().toLocaleTimeString();
        if (data.live) {
          setStatus(when + " \u00b7 live, every " + refreshS + " s");
          timer = setTimeout(function () { load(url, refreshS); }, refreshS * 1000);
        } else {
          setStatus(when + (data.ended ? " \u00b7 " + data.ended : ""));
        }
      })
      .catch(function (err) {
        setStatus("could not load: " + err.message + " (retrying)");
        body.dataset.failed = String(err.message);
        timer = setTimeout(function () { load(url, refreshS); }, refreshS * 2000);
      });
  }

  window.GoodputPage = {
    onData: function (fn) { hooks.push(fn); },
    load: function (url) { return load(url, Number(body.dataset.refreshS || 5)); },
    table: table,
    selected: selected
  };

  document.addEventListener("DOMContentLoaded", function () {
    if (body.dataset.dataUrl) { window.GoodputPage.load(body.dataset.dataUrl); }
  });
}());
