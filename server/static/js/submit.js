// The Submit page (templates/submit.html): shows only the groups of the chosen kind,
// dataset, model, optimizer and schedule, and disables the inputs of the others so the
// form sends only what the chosen ones use. Uploads a chosen CSV through the API and
// offers its columns as the target. The server renders a complete, working form without
// any of this.
"use strict";

(() => {
  const form = document.getElementById("submit-form");
  if (!form) return;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  // Stable ids (spec_form.py derives them from the spec paths).
  const datasetSelect = document.getElementById("f-train-dataset-name");
  const modelSelect = document.getElementById("f-train-model-name");

  // A change the page made for the user, said next to the input it changed.
  function announce(control, message) {
    const note = document.getElementById(`${control.id}-note`);
    if (note) note.textContent = message;
  }

  function selectorValue(id) {
    const controls = form.querySelectorAll(`[data-selector="${CSS.escape(id)}"]`);
    for (const control of controls) {
      if (control.type === "radio") {
        if (control.checked) return control.value;
      } else if (control.type === "checkbox") {
        return control.checked ? "true" : "";
      } else {
        return control.value;
      }
    }
    return "";
  }

  function datasetKind(selectId) {
    const select = document.getElementById(selectId);
    const option = select ? select.selectedOptions[0] : null;
    return option ? option.dataset.kind || "" : "";
  }

  // Show the active groups; disable every input inside a hidden one.
  function update() {
    for (const el of form.querySelectorAll("[data-when-field]")) {
      el.hidden = selectorValue(el.dataset.whenField) !== el.dataset.whenValue;
    }
    for (const el of form.querySelectorAll("[data-image-only]")) {
      el.hidden = datasetKind(el.dataset.imageOnly) !== "image";
    }
    for (const control of form.querySelectorAll("input, select, textarea")) {
      if (control.type === "hidden") continue;
      control.disabled = control.closest("[hidden]") !== null;
    }
  }

  // Models that cannot take the chosen dataset's kind of data are not offered.
  function fitModels(switchIfNeeded) {
    if (!datasetSelect || !modelSelect) return;
    const chosen = datasetSelect.selectedOptions[0];
    const kind = chosen ? chosen.dataset.kind : "";
    if (!kind) return;
    let firstFit = null;
    for (const option of modelSelect.options) {
      const inputs = option.dataset.inputs;
      const fits = !inputs || inputs.split(" ").includes(kind);
      // On load, never disable the selected option: a disabled option is not submitted.
      option.disabled = !fits && (switchIfNeeded || !option.selected);
      if (fits && !firstFit) firstFit = option;
    }
    const current = modelSelect.selectedOptions[0];
    if (switchIfNeeded && current && current.disabled && firstFit) {
      modelSelect.value = firstFit.value;
      announce(
        modelSelect,
        `Changed to ${firstFit.value}: ${current.value} does not take ${kind} data.`,
      );
    } else if (switchIfNeeded) {
      announce(modelSelect, "");
    }
  }

  form.addEventListener("change", (event) => {
    const target = event.target;
    if (target === datasetSelect) fitModels(true);
    if (target.dataset.selector !== undefined || target === datasetSelect) update();
    if (target.matches('input[type="file"][data-upload-field]')) uploadFile(target);
    if (target.matches("[data-upload-id-for]")) loadUpload(target);
    if (target.matches("select[data-columns-for]")) suggestTask(target);
  });

  // ---------------------------------------------------------------- field errors

  function fieldBox(input) {
    return input.closest(".field");
  }

  function showError(input, message) {
    clearError(input);
    const box = fieldBox(input);
    const error = document.createElement("p");
    error.className = "field-error";
    error.id = `${input.id}-error`;
    error.textContent = message;
    input.insertAdjacentElement("afterend", error);
    box.classList.add("has-error");
    input.setAttribute("aria-invalid", "true");
    const described = (input.getAttribute("aria-describedby") || "").split(" ");
    if (!described.includes(error.id)) {
      input.setAttribute("aria-describedby", [...described, error.id].join(" ").trim());
    }
  }

  function clearError(input) {
    const error = document.getElementById(`${input.id}-error`);
    if (error) error.remove();
    fieldBox(input).classList.remove("has-error");
    input.removeAttribute("aria-invalid");
  }

  // ---------------------------------------------------------------- CSV uploads

  function statusFor(fileInput) {
    return document.getElementById(`${fileInput.id}-status`);
  }

  function describeUpload(upload) {
    const columns = upload.columns.length;
    return `Upload ${upload.id}: ${upload.filename}, ${upload.rows.toLocaleString()} rows, ` +
      `${columns} column${columns === 1 ? "" : "s"}.`;
  }

  async function uploadFile(input) {
    const file = input.files[0];
    const status = statusFor(input);
    clearError(input);
    if (!file) return;
    const limit = Number(input.dataset.maxBytes);
    if (limit && file.size > limit) {
      showError(input, `is larger than ${limit.toLocaleString()} bytes`);
      return;
    }
    status.classList.add("busy");
    status.textContent = `Uploading ${file.name}…`;
    const body = new FormData();
    body.append("file", file);
    let response;
    let data;
    try {
      response = await fetch("/api/v1/uploads", {
        method: "POST",
        body,
        headers: { "X-CSRFToken": csrf, Accept: "application/json" },
        credentials: "same-origin",
      });
      data = await response.json();
    } catch (err) {
      status.classList.remove("busy");
      status.textContent = "";
      showError(input, `the upload failed (${err.message}); try again`);
      return;
    }
    status.classList.remove("busy");
    if (!response.ok) {
      status.textContent = "";
      const error = data && data.error ? data.error : {};
      showError(input, (error.fields && error.fields.file) || error.message || "the upload failed");
      return;
    }
    const idInput = document.getElementById(input.dataset.uploadField);
    if (idInput) {
      idInput.value = String(data.id);
      clearError(idInput);
    }
    // The file is stored now: the form sends its id, not the file again.
    input.value = "";
    status.textContent = `${describeUpload(data)} Check the target column below.`;
    fillColumns(input.dataset.uploadField, data.columns, true, data.id);
  }

  // An upload id typed in by hand: look the upload up to offer its columns.
  async function loadUpload(idInput) {
    const id = idInput.value.trim();
    const fileInput = form.querySelector(`input[type="file"][data-upload-field="${idInput.id}"]`);
    clearError(idInput);
    if (!/^[1-9][0-9]{0,17}$/.test(id)) return;
    let response;
    try {
      response = await fetch(`/api/v1/uploads/${id}`, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
    } catch {
      return; // the server checks the id on submit anyway
    }
    if (response.status === 404) {
      showError(idInput, `upload ${id} does not exist`);
      return;
    }
    if (!response.ok) return;
    const data = await response.json();
    if (fileInput) statusFor(fileInput).textContent = describeUpload(data);
    fillColumns(idInput.id, data.columns, false, data.id);
  }

  // More columns than this get a searched text input, not a select (the page would
  // carry every column otherwise): the server renders the same.
  const columnLimit = Number(form.dataset.columnLimit || 200);

  function columnNote(column) {
    const kind = column.numeric ? "numeric" : "text";
    return `${kind}, ${column.distinct}${column.distinct > 1000 ? "+" : ""} values`;
  }

  function fillColumnSearch(current, uploadFieldId, columns, uploadId) {
    const input = document.createElement("input");
    input.type = "text";
    for (const name of ["id", "name"]) {
      const value = current.getAttribute(name);
      if (value !== null) input.setAttribute(name, value);
    }
    const names = new Set(columns.map((c) => c.name));
    input.value = names.has(current.value) ? current.value : "";
    input.dataset.columnsFor = uploadFieldId;
    input.dataset.columnSearch = String(uploadId);
    input.autocomplete = "off";
    input.placeholder = `Type to search ${columns.length.toLocaleString("en")} columns`;
    const list = document.createElement("datalist");
    list.id = `${input.id}-columns`;
    input.setAttribute("list", list.id);
    setColumnOptions(list, columns.slice(0, columnLimit));
    const note = document.createElement("p");
    note.className = "field-note";
    note.id = `${input.id}-columns-note`;
    note.setAttribute("aria-live", "polite");
    note.textContent = `Upload ${uploadId} has ${columns.length.toLocaleString("en")} columns: type part of a name to search them all.`;
    const described = current.getAttribute("aria-describedby") || "";
    input.setAttribute("aria-describedby", `${note.id} ${described}`.trim());
    for (const old of [`${input.id}-columns`, `${input.id}-columns-note`]) {
      const stale = document.getElementById(old);
      if (stale) stale.remove();
    }
    input.disabled = current.disabled;
    current.replaceWith(input);
    input.after(list, note);
  }

  function setColumnOptions(list, columns) {
    list.replaceChildren(
      ...columns.map((column) => {
        const option = document.createElement("option");
        option.value = column.name;
        option.textContent = columnNote(column);
        return option;
      }),
    );
  }

  // Search-as-you-type over every column of a wide upload.
  let columnSearchTimer = null;
  let columnSearchSeq = 0;
  form.addEventListener("input", (event) => {
    const input = event.target;
    if (!input.matches("input[data-column-search]")) return;
    clearTimeout(columnSearchTimer);
    columnSearchTimer = setTimeout(() => searchColumns(input), 150);
  });

  async function searchColumns(input) {
    const seq = ++columnSearchSeq;
    const id = input.dataset.columnSearch;
    const q = encodeURIComponent(input.value.trim());
    let data;
    try {
      const response = await fetch(`/api/v1/uploads/${id}/columns?q=${q}&limit=50`, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (!response.ok) return;
      data = await response.json();
    } catch {
      return; // the server checks the name on submit anyway
    }
    if (seq !== columnSearchSeq) return; // a later keystroke's answer wins
    const list = document.getElementById(input.getAttribute("list"));
    if (list) setColumnOptions(list, data.columns);
    const note = document.getElementById(`${input.id}-columns-note`);
    if (note) {
      note.textContent = input.value.trim()
        ? `${data.total.toLocaleString("en")} column${data.total === 1 ? "" : "s"} match "${input.value.trim()}"${data.total > data.columns.length ? `; the first ${data.columns.length} are listed` : ""}.`
        : note.textContent;
    }
  }

  function fillColumns(uploadFieldId, columns, preselect, uploadId) {
    const current = form.querySelector(`[data-columns-for="${CSS.escape(uploadFieldId)}"]`);
    if (!current) return;
    if (columns.length > columnLimit) {
      fillColumnSearch(current, uploadFieldId, columns, uploadId);
      return;
    }
    for (const old of [`${current.id}-columns`, `${current.id}-columns-note`]) {
      const stale = document.getElementById(old);
      if (stale) stale.remove();
    }
    const previous = current.value;
    const select = document.createElement("select");
    for (const name of ["id", "name", "aria-describedby"]) {
      const value = current.getAttribute(name);
      if (value !== null) select.setAttribute(name, value);
    }
    select.dataset.columnsFor = uploadFieldId;
    select.add(new Option("Choose a column…", ""));
    for (const column of columns) {
      const kind = column.numeric ? "numeric" : "text";
      const label = `${column.name} · ${kind}, ${column.distinct} values`;
      const option = new Option(label, column.name);
      option.dataset.numeric = String(column.numeric);
      option.dataset.distinct = String(column.distinct);
      select.add(option);
    }
    const names = columns.map((c) => c.name);
    if (names.includes(previous)) {
      select.value = previous;
    } else if (preselect && names.length) {
      // The usual layout puts the label last.
      select.value = names[names.length - 1];
    }
    select.disabled = current.disabled;
    current.replaceWith(select);
    if (select.value) suggestTask(select);
  }

  // Many distinct numbers look like a regression target; few values like classes.
  function suggestTask(select) {
    const option = select.selectedOptions[0];
    const group = select.closest(".group");
    const task = group ? group.querySelector('select[name="dataset.params.task"]') : null;
    if (!option || !option.dataset.numeric || !task) return;
    const regression = option.dataset.numeric === "true" && Number(option.dataset.distinct) > 20;
    const wanted = regression ? "regression" : "classification";
    if (task.value !== wanted) {
      task.value = wanted;
      announce(task, `Set to ${wanted} for target column ${select.value}.`);
    }
  }

  for (const input of form.querySelectorAll('input[type="file"][data-upload-field]')) {
    const idInput = document.getElementById(input.dataset.uploadField);
    if (idInput) idInput.dataset.uploadIdFor = input.id;
  }

  // ---------------------------------------------------------------- live estimate

  // The job's size and memory as the user types, and the account limits it would
  // exceed. The server works it out from the fields a submit would send
  // (POST /submit/estimate), so the page builds no spec of its own.
  const estimateBox = document.getElementById("job-estimate");
  const estimateFigures = document.getElementById("estimate-figures");
  const estimateOver = document.getElementById("estimate-over");
  let estimateTimer = null;
  let estimateSeq = 0;

  function formatBytes(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let n = bytes;
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${i === 0 || n >= 100 ? Math.round(n) : n.toPrecision(3)} ${units[i]}`;
  }

  // The label of the active input a spec path names ("model.params.hidden").
  function labelFor(path) {
    const control = form.querySelector(`[name="${CSS.escape(path)}"]:not([disabled])`);
    const box = control ? control.closest(".field") : null;
    const label = box ? box.querySelector("label, legend") : null;
    return label ? label.textContent.trim() : path;
  }

  function showEstimate(data) {
    const memory = data.memory_bytes;
    if (data.params === null || !memory) {
      estimateBox.hidden = true;
      return;
    }
    const parts = [
      ["weights", memory.weights],
      ["gradients", memory.gradients],
      ["optimizer state", memory.optimizer_state],
      [`activations of a ${data.batch.toLocaleString()}-sample batch`, memory.activations],
      ["data", memory.data],
    ].filter(([, bytes]) => bytes > 0);
    estimateFigures.textContent =
      `Estimate: ${data.params.toLocaleString()} parameters, about ` +
      `${formatBytes(memory.total)} of memory ` +
      `(${parts.map(([name, bytes]) => `${name} ${formatBytes(bytes)}`).join(", ")}).`;
    const over = Object.entries(data.exceeded);
    estimateOver.replaceChildren(
      ...over.map(([path, message]) => {
        const item = document.createElement("li");
        item.textContent = `Over your limits: ${labelFor(path)}: ${message}`;
        return item;
      }),
    );
    estimateOver.hidden = over.length === 0;
    estimateBox.classList.toggle("over", over.length > 0);
    estimateBox.hidden = false;
  }

  async function refreshEstimate() {
    const seq = ++estimateSeq;
    const body = new FormData(form);
    body.delete("file"); // a chosen CSV is uploaded on its own, not estimated
    let data;
    try {
      const response = await fetch("/submit/estimate", {
        method: "POST",
        body,
        headers: { "X-CSRFToken": csrf, Accept: "application/json" },
        credentials: "same-origin",
      });
      // Half-typed input is not a job yet: its problems show on submit.
      data = response.ok ? await response.json() : null;
    } catch {
      data = null;
    }
    if (seq !== estimateSeq) return; // a newer answer is on its way
    if (data) showEstimate(data);
    else estimateBox.hidden = true;
  }

  function scheduleEstimate() {
    if (!estimateBox) return;
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(refreshEstimate, 300);
  }

  form.addEventListener("input", scheduleEstimate);
  form.addEventListener("change", scheduleEstimate);

  // ---------------------------------------------------------------- errors and submit

  // Links in the error summary open a collapsed section and focus the input.
  const summary = document.getElementById("error-summary");
  if (summary) {
    summary.addEventListener("click", (event) => {
      const link = event.target.closest("a[data-focus]");
      if (!link) return;
      const target = document.getElementById(link.dataset.focus);
      if (!target) return;
      event.preventDefault();
      const details = target.closest("details");
      if (details) details.open = true;
      const focusable = target.matches("input, select, textarea")
        ? target
        : target.querySelector("input:not([disabled]), select:not([disabled])") || target;
      if (focusable === target && !target.matches("input, select, textarea")) {
        target.setAttribute("tabindex", "-1");
      }
      focusable.focus();
      focusable.scrollIntoView({ block: "center" });
    });
  }

  const button = document.getElementById("submit-button");
  form.addEventListener("submit", () => {
    // One click, one job: a second click while the first is on its way would submit twice.
    if (button) {
      setTimeout(() => {
        button.disabled = true;
        button.textContent = "Submitting…";
      }, 0);
    }
  });
  window.addEventListener("pageshow", () => {
    if (button) {
      button.disabled = false;
      button.textContent = "Submit job";
    }
  });

  fitModels(false);
  update();
  scheduleEstimate();
  const message = summary || document.getElementById("form-message");
  if (message) message.focus();
})();
