/* The runs page: the filter form (empty fields left out of the URL), "Compare selected"
   (enabled with exactly two runs ticked: the first ticked is the baseline, the second the
   candidate), the empty state and the link to older runs. The table
   itself is dashboard.js's. Every string is placed with textContent. */
(function () {
  "use strict";
  var runsEl = document.getElementById("runs");
  var button = document.getElementById("compare");
  var hint = document.getElementById("compare-hint");
  var form = document.querySelector("form.filters");
  var order = [];   // ticked run ids, in the order they were ticked
  var names = {};

  if (form) {
    form.addEventListener("submit", function () {
      Array.prototype.forEach.call(form.elements, function (el) {
        if (el.name && !el.value) { el.disabled = true; }   // no empty fields in the URL
      });
    });
  }

  function say(parts) {
    hint.replaceChildren();
    parts.forEach(function (p) {
      var node = p.bold ? document.createElement("b") : document.createTextNode(p.text);
      if (p.bold) { node.textContent = p.text; }
      hint.appendChild(node);
    });
  }

  function update() {
    var ticked = window.GoodputPage.selected(runsEl);
    order = order.filter(function (id) { return ticked.indexOf(id) >= 0; });
    ticked.forEach(function (id) { if (order.indexOf(id) < 0) { order.push(id); } });
    button.disabled = order.length !== 2;
    if (order.length === 2) {
      say([{text: "baseline "}, {text: names[order[0]] || order[0], bold: true},
           {text: " \u00b7 candidate "}, {text: names[order[1]] || order[1], bold: true}]);
    } else if (order.length > 2) {
      say([{text: "Tick exactly two runs to compare (" + order.length + " ticked)."}]);
    } else {
      say([{text: "Tick two runs: the first ticked is the "}, {text: "baseline", bold: true},
           {text: ", the second the "}, {text: "candidate", bold: true}, {text: "."}]);
    }
  }

  runsEl.addEventListener("selection", update);
  button.addEventListener("click", function () {
    if (order.length !== 2) { return; }
    var q = new URLSearchParams({baseline: order[0], candidate: order[1]});
    window.location.assign(button.dataset.compareUrl + "?" + q.toString());
  });

  window.GoodputPage.onData(function (data) {
    names = data.names || {};
    document.getElementById("no-runs").hidden = !!data.any_runs;
    document.getElementById("listing").hidden = !data.any_runs;
    var older = document.getElementById("older");
    older.hidden = !data.next;
    if (data.next) { older.href = data.next; }
    update();
  });
}());
