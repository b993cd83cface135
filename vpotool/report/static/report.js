// The gallery of a vpotool report: its rows are embedded as JSON in the page; this filters, sorts and pages them
// and renders each as a card whose videos play, pause and seek together. No libraries, no network.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("gallery-data").textContent);
  const cards = document.getElementById("cards");
  if (!cards) return; // a report without a gallery
  const $ = (id) => document.getElementById(id);
  const state = { filter: "", sort: "margin-desc", page: 0 };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }
  const fmt = (v) => (typeof v === "number" ? v.toFixed(3) : "–");
  // Missing numbers sort last whichever the direction.
  const byNumber = (key, sign) => (a, b) =>
    (a[key] === null) - (b[key] === null) || sign * ((a[key] || 0) - (b[key] || 0));
  const ORDERS = {
    "margin-desc": byNumber("margin", -1),
    "margin-asc": byNumber("margin", 1),
    prompt: (a, b) => a.prompt.localeCompare(b.prompt),
    iteration: (a, b) => byNumber("iteration", 1)(a, b) || byNumber("margin", -1)(a, b),
  };

  function visible() {
    const q = state.filter.trim().toLowerCase();
    const rows = data.items.filter((it) => !q || it.prompt.toLowerCase().includes(q));
    return rows.sort(ORDERS[state.sort]);
  }

  // Videos of one card follow the first: one button plays or pauses all, one slider seeks all, drift is corrected.
  function sync(videos, button, slider) {
    const lead = videos[0];
    if (!lead) {
      button.disabled = slider.disabled = true;
      return;
    }
    const all = (fn) => videos.forEach(fn);
    const toggle = () => {
      if (lead.paused) all((v) => { v.currentTime = lead.currentTime; v.play().catch(() => {}); });
      else all((v) => v.pause());
    };
    button.addEventListener("click", toggle);
    all((v) => v.addEventListener("click", toggle));
    lead.addEventListener("play", () => { button.textContent = "pause"; });
    lead.addEventListener("pause", () => { button.textContent = "play"; });
    lead.addEventListener("timeupdate", () => {
      if (lead.duration) slider.value = String(Math.round((1000 * lead.currentTime) / lead.duration));
      for (const v of videos) if (v !== lead && Math.abs(v.currentTime - lead.currentTime) > 0.15) v.currentTime = lead.currentTime;
    });
    slider.addEventListener("input", () => {
      all((v) => { if (v.duration) v.currentTime = (Number(slider.value) / 1000) * v.duration; });
    });
  }

  function scoreTable(videos) {
    const dims = [...new Set(videos.flatMap((v) => Object.keys(v.scores)))];
    const head = el("tr", {}, el("th", {}, "score"), ...videos.map((v) => el("th", {}, v.label)));
    const rows = dims.map((d) => {
      const values = videos.map((v) => v.scores[d]);
      const best = Math.max(...values.filter((x) => typeof x === "number"));
      return el("tr", {}, el("th", {}, d),
        ...values.map((x) => el("td", x === best && videos.length > 1 ? { class: "best" } : {}, fmt(x))));
    });
    return el("table", { class: "scores" }, el("thead", {}, head), el("tbody", {}, ...rows));
  }

  function card(item) {
    const videos = [];
    const figures = item.videos.map((v) => {
      let media = el("div", { class: "novideo" }, "no video");
      if (v.video) {
        media = el("video", { src: v.video, preload: "auto", loop: "", playsinline: "", title: v.id });
        media.muted = true;
        videos.push(media);
      }
      return el("figure", { "data-label": v.label }, media, el("figcaption", {}, `${v.label} `, el("b", {}, fmt(v.score))));
    });
    const button = el("button", { type: "button", class: "play" }, "play");
    const slider = el("input", { type: "range", min: "0", max: "1000", value: "0", "aria-label": "seek" });
    sync(videos, button, slider);
    const meta = [`margin ${fmt(item.margin)}`, item.iteration === null ? null : `iteration ${item.iteration}`, item.note];
    return el("article", { class: "card", "data-id": item.id },
      el("h3", {}, item.prompt),
      el("p", { class: "meta" }, meta.filter(Boolean).join(" · ")),
      el("div", { class: "videos" }, ...figures),
      el("div", { class: "transport" }, button, slider),
      scoreTable(item.videos));
  }

  function render() {
    const rows = visible();
    const pages = Math.max(1, Math.ceil(rows.length / data.pageSize));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    for (const v of cards.querySelectorAll("video")) { v.pause(); v.removeAttribute("src"); v.load(); }
    const start = state.page * data.pageSize;
    cards.replaceChildren(...rows.slice(start, start + data.pageSize).map(card));
    $("count").textContent = `${rows.length} of ${data.items.length} ${data.noun}`;
    $("page").textContent = `page ${state.page + 1} of ${pages}`;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
  }

  $("filter").addEventListener("input", (e) => { state.filter = e.target.value; state.page = 0; render(); });
  $("sort").addEventListener("change", (e) => { state.sort = e.target.value; state.page = 0; render(); });
  $("prev").addEventListener("click", () => { state.page -= 1; render(); });
  $("next").addEventListener("click", () => { state.page += 1; render(); });
  render();
})();
