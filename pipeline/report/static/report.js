// Sorting and filtering of the report's tables, and the opacity of the maps drawn over images.
//
// Progressive enhancement: without this file every table is complete and every image shown;
// the filter controls stay hidden. The file holds no data. It reads what the page already has:
// a header's data-sort ("num" or "text") and data-key, a cell's data-v (its sort value; the
// cell's text when absent), a filter control's data-filter and data-key.
(function () {
  "use strict";

  // A cell's value: a number (null when missing), or lower-case text.
  function value(cell, numeric) {
    const raw = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
    if (!numeric) {
      return raw.toLowerCase();
    }
    const x = parseFloat(raw);
    return Number.isNaN(x) ? null : x;
  }

  function sortable(table) {
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach(function (th, col) {
      const kind = th.getAttribute("data-sort");
      if (kind !== "num" && kind !== "text") {
        return;
      }
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      button.textContent = th.textContent;
      th.textContent = "";
      th.appendChild(button);
      button.addEventListener("click", function () {
        const ascending = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        const body = table.tBodies[0];
        const rows = Array.from(body.rows).map(function (row, i) {
          return [value(row.cells[col], kind === "num"), i, row];
        });
        rows.sort(function (a, b) {
          if (a[0] === null || b[0] === null) {  // missing values last, either way
            return a[0] === b[0] ? a[1] - b[1] : (a[0] === null ? 1 : -1);
          }
          const c = a[0] < b[0] ? -1 : (a[0] > b[0] ? 1 : 0);
          return (ascending ? c : -c) || a[1] - b[1];
        });
        rows.forEach(function (r) { body.appendChild(r[2]); });
      });
    });
  }

  // A row test for one filter control, or null when the control is empty.
  function test(control, keys) {
    const kind = control.getAttribute("data-filter");
    if (kind === "flag") {
      const attr = "data-" + control.getAttribute("data-key");
      return control.checked ? function (row) { return row.getAttribute(attr) === "yes"; } : null;
    }
    const text = control.value.trim();
    if (text === "") {
      return null;
    }
    if (kind === "text") {
      const needle = text.toLowerCase();
      return function (row) { return row.textContent.toLowerCase().indexOf(needle) >= 0; };
    }
    const col = keys.indexOf(control.getAttribute("data-key"));
    if (col < 0) {
      return null;
    }
    if (kind === "choice") {
      return function (row) { return row.cells[col].textContent.trim() === text; };
    }
    const bound = parseFloat(text);
    if (Number.isNaN(bound)) {
      return null;
    }
    return function (row) {
      const x = value(row.cells[col], true);
      return x !== null && (kind === "max" ? x <= bound : x >= bound);
    };
  }

  function filterable(box) {
    const table = document.getElementById(box.getAttribute("data-for"));
    if (!table) {
      return;
    }
    const keys = Array.from(table.tHead.rows[0].cells).map(function (th) {
      return th.getAttribute("data-key");
    });
    const controls = Array.from(box.querySelectorAll("[data-filter]"));
    const count = box.querySelector("output");
    function apply() {
      const tests = controls.map(function (c) { return test(c, keys); }).filter(Boolean);
      const rows = table.tBodies[0].rows;
      let shown = 0;
      for (let i = 0; i < rows.length; i += 1) {
        const keep = tests.every(function (t) { return t(rows[i]); });
        rows[i].hidden = !keep;
        shown += keep ? 1 : 0;
      }
      if (count) {
        count.textContent = shown + " of " + rows.length + " shown";
      }
    }
    box.addEventListener("input", apply);
    box.addEventListener("change", apply);
    box.hidden = false;
    apply();
  }

  function opacity(input) {
    function set() {
      document.documentElement.style.setProperty("--map-opacity", String(input.value / 100));
    }
    input.addEventListener("input", set);
    set();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(sortable);
    document.querySelectorAll("div.filters[data-for]").forEach(filterable);
    document.querySelectorAll("input[data-opacity]").forEach(opacity);
    document.querySelectorAll(".js-only").forEach(function (el) { el.hidden = false; });
  });
})();
