/* The compare page: show the verdict or the refusal (with the links that would fix it) from
   the data dashboard.js fetched, and each run's status; every string placed with
   textContent. */
(function () {
  "use strict";

  function byId(id) { return document.getElementById(id); }

  function fill(list, items, make) {
    list.replaceChildren();
    items.forEach(function (item) { list.appendChild(make(item)); });
  }

  function statuses(data) {   // data.statuses: run id -> status
    var got = data.statuses || {};
    document.querySelectorAll("[data-run-status]").forEach(function (badge) {
      var s = got[badge.getAttribute("data-run-status")];
      if (s) { badge.textContent = s; badge.className = "badge badge-" + s; }
    });
  }

  window.GoodputPage.onData(function (data) {
    var verdict = data.verdict;
    var refusal = data.refusal;
    statuses(data);
    byId("verdict-panel").hidden = !verdict;
    byId("refusal").hidden = !refusal;
    byId("lane-panel").hidden = !!refusal;  // the refusal lists the fields that differ
    if (verdict) {
      var v = byId("verdict");
      v.textContent = verdict.verdict;
      v.className = "verdict verdict-" + verdict.verdict;
      byId("verdict-meaning").textContent = verdict.meaning || "";
      fill(byId("reasons"), verdict.reasons, function (text) {
        var li = document.createElement("li");
        li.textContent = text;
        return li;
      });
    }
    if (refusal) {
      fill(byId("refusal-fixes"), refusal.fixes, function (fix) {
        var li = document.createElement("li");
        var a = document.createElement("a");
        a.href = fix.href;
        a.textContent = fix.text;
        li.appendChild(a);
        return li;
      });
    }
  });
}());
