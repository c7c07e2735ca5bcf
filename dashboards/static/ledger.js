/* The ledger: its empty state while no knob value has a verdict (the tables and the trend
   are dashboard.js's); the trend, drawn while hidden, is fitted once shown. */
(function () {
  "use strict";
  window.GoodputPage.onData(function (data) {
    var body = document.getElementById("ledger-body");
    var appears = body.hidden && data.any;
    document.getElementById("no-entries").hidden = !!data.any;
    body.hidden = !data.any;
    var trend = document.getElementById("ledger-trend");
    if (appears && trend && trend.data) { window.Plotly.Plots.resize(trend); }
  });
}());
