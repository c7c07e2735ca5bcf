/* The receipt page: the completeness and the seams' lines marked good or bad (their text
   comes from the page's data and is placed by dashboard.js); the list of every observation
   opens by itself when some seam is flagged. */
(function () {
  "use strict";
  function mark(id, ok) {
    var el = document.getElementById(id);
    if (el) { el.className = "line " + (ok ? "ok" : "bad"); }
  }
  window.GoodputPage.onData(function (data) {
    var tables = data.tables || {};
    mark("completeness", !((tables["missing-table"] || {}).rows || []).length);
    var flagged = ((tables["seams-table"] || {}).flags || []).some(Boolean);
    mark("seams-summary", !flagged);
    var details = document.querySelector("details.observations");
    if (details && flagged && !details.dataset.seen) {
      details.open = true;
      details.dataset.seen = "1";
    }
  });
}());
