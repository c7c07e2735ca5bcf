/* The routing page: the E layer selector opens that layer's view (or the overview of
   every layer), keeping the other query fields; a run whose first routing records arrive
   while the page shows why it has none is shown again. Drawing is dashboard.js's. */
(function () {
  "use strict";
  var select = document.getElementById("layer");
  if (select) {
    select.addEventListener("change", function () {
      var query = new URLSearchParams(window.location.search);
      query.set("layer", select.value);
      window.location.search = query.toString();
    });
  }
  window.GoodputPage.onData(function (data) {
    if (!select && data.layers && data.layers.length) { window.location.reload(); }
  });
}());
