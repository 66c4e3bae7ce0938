// dishbot's chat page. No library, nothing from elsewhere. Every text from the server
// (answers, notices) is set with textContent, never parsed as HTML.
"use strict";
(function () {
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const words = page.words;
  const log = document.getElementById("log");
  const statusLine = document.getElementById("status");
  const form = document.getElementById("ask");
  const photoInput = document.getElementById("photo");
  const question = document.getElementById("question");
  const preview = document.getElementById("preview");
  const previewImage = document.getElementById("preview-image");
  const drop = document.getElementById("drop");
  let photo = null; // the File to send with the next question
  let lastAnswerId = null; // follow-ups go to the latest answer
  const localPhotos = new Map(); // message id -> object URL of the photo sent with it

  function post(path, body, isJson) {
    const headers = { "X-CSRF-Token": page.csrf };
    if (isJson) headers["Content-Type"] = "application/json";
    return fetch(path, {
      method: "POST",
      headers: headers,
      body: isJson ? JSON.stringify(body) : body,
      credentials: "same-origin",
    }).then(async (response) => {
      if (response.ok) return response.json();
      let message = response.statusText;
      try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    });
  }

  function showStatus(text) {
    statusLine.textContent = text;
    statusLine.hidden = !text;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- messages ------------------------------------------------------------------------

  function messageNode(id, author) {
    let node = document.getElementById("m-" + id);
    if (!node) {
      node = element("article", "msg " + author);
      node.id = "m-" + id;
      node.dataset.id = id;
      node.append(element("div", "text"), element("div", "buttons"));
      log.append(node);
    }
    return node;
  }

  function attachPhoto(id) {
    const url = localPhotos.get(id);
    const node = document.getElementById("m-" + id);
    if (!url || !node || node.querySelector("img")) return;
    const image = element("img", "photo");
    image.src = url;
    image.alt = "";
    node.prepend(image);
  }

  function render(message) {
    const node = messageNode(message.id, message.author);
    node.querySelector(".text").textContent = message.text;
    attachPhoto(message.id);
    const row = node.querySelector(".buttons");
    row.replaceChildren();
    for (const button of message.buttons || []) {
      const press = element("button", "press", button.label);
      press.type = "button";
      press.dataset.action = button.data;
      press.addEventListener("click", () => {
        post("/press", { message_id: message.id, data: button.data }, true)
          .catch((error) => showStatus(error.message));
      });
      row.append(press);
    }
    if (message.author === "bot" && (message.buttons || []).length) lastAnswerId = message.id;
    document.getElementById("typing")?.remove();
    node.scrollIntoView({ block: "end" });
  }

  function correctionForm(update) {
    const node = document.getElementById("m-" + update.message_id);
    if (!node || node.querySelector("form")) return;
    const fix = element("form", "correction");
    const label = element("label", "", update.prompt);
    const input = element("input");
    input.maxLength = 500;
    input.required = true;
    label.append(input);
    const send = element("button", "", words.web_correction_send);
    send.type = "submit";
    fix.append(label, send);
    fix.addEventListener("submit", (event) => {
      event.preventDefault();
      post("/correct", { exchange_id: update.exchange_id, text: input.value }, true)
        .then(() => fix.remove())
        .catch((error) => showStatus(error.message));
    });
    node.append(fix);
    input.focus();
  }

  function typing() {
    if (document.getElementById("typing")) return;
    const dots = element("div", "msg bot typing", "…");
    dots.id = "typing";
    log.append(dots);
  }

  // -- the stream ----------------------------------------------------------------------

  function listen() {
    const events = new EventSource("/events");
    events.onopen = () => showStatus("");
    events.onerror = () => showStatus(words.web_connection_lost);
    events.onmessage = (event) => {
      const update = JSON.parse(event.data);
      if (update.kind === "message") render(update);
      else if (update.kind === "typing") typing();
      else if (update.kind === "notice") showStatus(update.text);
      else if (update.kind === "correction") correctionForm(update);
      else if (update.kind === "reconnect") { events.close(); setTimeout(listen, 500); }
    };
  }

  // -- asking --------------------------------------------------------------------------

  function choose(file) {
    if (!file) return;
    if (file.size > page.maxPhotoBytes) {
      showStatus(page.photoTooLarge);
      return;
    }
    photo = file;
    if (previewImage.src) URL.revokeObjectURL(previewImage.src);
    previewImage.src = URL.createObjectURL(file);
    preview.hidden = false;
    showStatus("");
    question.focus();
  }

  function clearPhoto() {
    photo = null;
    photoInput.value = "";
    preview.hidden = true;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = question.value.trim();
    if (!photo && !text) return;
    const body = new FormData();
    if (photo) body.append("photo", photo, photo.name || "photo.jpg");
    body.append("question", text);
    if (!photo && lastAnswerId) body.append("reply_to", lastAnswerId);
    const sent = photo;
    post("/ask", body, false)
      .then((reply) => {
        if (sent) localPhotos.set(reply.message_id, URL.createObjectURL(sent));
        attachPhoto(reply.message_id);
        showStatus("");
      })
      .catch((error) => showStatus(error.message));
    question.value = "";
    clearPhoto();
  });

  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  photoInput.addEventListener("change", () => choose(photoInput.files[0]));
  document.getElementById("preview-clear").addEventListener("click", clearPhoto);
  document.addEventListener("paste", (event) => {
    for (const item of event.clipboardData?.items || []) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        choose(item.getAsFile());
        event.preventDefault();
        return;
      }
    }
  });
  document.addEventListener("dragover", (event) => { event.preventDefault(); drop.hidden = false; });
  document.addEventListener("dragleave", (event) => {
    if (event.target === drop) drop.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.hidden = true;
    choose(event.dataTransfer?.files[0]);
  });

  listen();

  // Until the model answers, say how far it is (downloading, loading) or what is wrong,
  // as the server reports it; stop asking once it is ready, or has failed for good.
  const modelStatus = document.getElementById("model-status");
  const modelStatusText = document.getElementById("model-status-text");
  const modelProgress = document.getElementById("model-progress");
  const MODEL_STATUS_POLL_MS = 2000;
  const MODEL_STATUS_SLOW_POLL_MS = 30000;

  function showModelStatus(status) {
    modelStatus.dataset.phase = status.phase;
    modelStatus.className = "model-status " + status.phase;
    modelStatusText.textContent = status.message;
    const total = status.total_bytes;
    modelProgress.hidden = !total;
    if (total) modelProgress.value = Math.floor((100 * status.done_bytes) / total);
    modelStatus.hidden = status.ready;
  }

  function pollModelStatus() {
    fetch("/model-status", { credentials: "same-origin", cache: "no-store" })
      .then((response) => response.json())
      .then((status) => {
        showModelStatus(status);
        if (status.ready) return;
        // A failure for good waits for the operator to fix it and restart: ask now and then.
        const retrying = status.phase !== "failed" || status.retry_in_s;
        setTimeout(pollModelStatus, retrying ? MODEL_STATUS_POLL_MS : MODEL_STATUS_SLOW_POLL_MS);
      })
      .catch(() => setTimeout(pollModelStatus, MODEL_STATUS_POLL_MS));
  }

  if (!modelStatus.hidden) {
    const retrying = modelStatus.dataset.phase !== "failed" || modelStatus.dataset.retrying;
    setTimeout(pollModelStatus, retrying ? MODEL_STATUS_POLL_MS : MODEL_STATUS_SLOW_POLL_MS);
  }
})();
