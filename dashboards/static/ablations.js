/* The ablations list: the empty state while there is none (the table is dashboard.js's). */
(function () {
  "use strict";
  window.GoodputPage.onData(function (data) {
    document.getElementById("no-ablations").hidden = !!data.any;
    document.getElementById("ablation-list").hidden = !data.any;
  });
}());
