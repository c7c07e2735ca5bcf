/* The trends page: the filter form (empty fields left out of the URL), a click on a run's point opens the run (the point's customdata is its
   goodput page); the empty state shows while the service holds no run. The charts are
   dashboard.js's. */
(function () {
  "use strict";
  var IDS = ["goodput", "mix", "tokens", "mfu", "memory", "drop_rate", "max_vio"];
  var bound = {};
  var form = document.querySelector("form.filters");

  if (form) {
    form.addEventListener("submit", function () {
      Array.prototype.forEach.call(form.elements, function (el) {
        if (el.name && !el.value) { el.disabled = true; }   // no empty fields in the URL
      });
    });
  }

  function openOnClick(id) {
    var el = document.getElementById(id);
    if (!el || bound[id] || typeof el.on !== "function") { return; }
    el.on("plotly_click", function (ev) {
      var p = ev && ev.points && ev.points[0];
      if (p && typeof p.customdata === "string" && p.customdata.charAt(0) === "/") {
        window.location.assign(p.customdata);
      }
    });
    bound[id] = true;
  }

  window.GoodputPage.onData(function (data) {
    var grid = document.getElementById("trends");
    var show = !!(data.any_runs && data.matched);   // no charts of nothing
    var appears = grid.hidden && show;
    document.getElementById("no-runs").hidden = !!data.any_runs;
    grid.hidden = !show;
    if (appears) {   // drawn while hidden: fit the charts to their places now
      IDS.forEach(function (id) {
        var el = document.getElementById(id);
        if (el && el.data) { window.Plotly.Plots.resize(el); }
      });
    }
  });
  // Plotly gives an element its .on() once it drew there: bind after each draw
  new MutationObserver(function () { IDS.forEach(openOnClick); })
    .observe(document.body, {attributes: true, attributeFilter: ["data-draws"]});
}());
