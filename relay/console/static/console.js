// Relay console: small enhancements; every page works without this file.
(function () {
  "use strict";

  // Times arrive in UTC; show them in the viewer's zone, UTC on hover.
  var parts = {
    month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  };
  var thisYear = new Intl.DateTimeFormat(undefined, parts);
  var otherYear = new Intl.DateTimeFormat(undefined, Object.assign({ year: "numeric" }, parts));
  function localTimes(root) {
    var year = new Date().getFullYear();
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      if (el.dataset.local) return;
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when)) return;
      el.title = el.textContent.trim();
      el.textContent = (when.getFullYear() === year ? thisYear : otherYear).format(when);
      el.dataset.local = "1";
    });
  }

  // Times typed into filters are in the viewer's zone: say so, and tell the server the offset.
  function zoneFields() {
    var offset = String(-new Date().getTimezoneOffset());
    var name = Intl.DateTimeFormat().resolvedOptions().timeZone || "your time";
    document.querySelectorAll("input[data-tz-offset]").forEach(function (el) { el.value = offset; });
    document.querySelectorAll("[data-tz-label]").forEach(function (el) { el.textContent = "(" + name + ")"; });
  }

  function copyButtons() {
    document.querySelectorAll("button[data-copy]").forEach(function (button) {
      var source = document.getElementById(button.dataset.copy);
      if (!source || !navigator.clipboard) return;
      button.hidden = false;
      button.addEventListener("click", function () {
        navigator.clipboard.writeText(source.textContent).then(function () {
          button.textContent = "Copied";
          setTimeout(function () { button.textContent = "Copy"; }, 1500);
        });
      });
    });
  }

  function selectAll() {
    document.querySelectorAll("input[data-select-all]").forEach(function (box) {
      var name = box.dataset.selectAll;
      box.hidden = false;
      box.addEventListener("change", function () {
        box.form.querySelectorAll("input[type=checkbox][name='" + name + "']").forEach(function (el) {
          el.checked = box.checked;
        });
      });
    });
  }

  // A delivery still in progress refreshes its status and attempts until it ends.
  function live() {
    var box = document.querySelector("[data-live]");
    if (!box || box.hasAttribute("data-final")) return;
    var url = box.dataset.live, polls = 0;
    function poll() {
      polls += 1;
      fetch(url, { credentials: "same-origin", headers: { "X-Relay-Fragment": "1" } })
        .then(function (response) {
          if (!response.ok) throw new Error(response.status);
          return response.text();
        })
        .then(function (html) {
          box.innerHTML = html;
          localTimes(box);
          var ended = box.querySelector("[data-live-note]") === null;
          if (ended) {
            box.setAttribute("data-final", "");
            // the page's actions depend on the new status
            if (document.querySelector(".actions-row")) window.location.reload();
          } else if (polls < 180) {
            setTimeout(poll, 1000);
          }
        })
        .catch(function () { if (polls < 180) setTimeout(poll, 3000); });
    }
    setTimeout(poll, 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    zoneFields();
    copyButtons();
    selectAll();
    live();
  });
})();
