// The playground's entry: tabs, the API key field, then the chat and /run panels.
import { apiKey, setApiKey } from "./api.js";
import { initChat } from "./chat.js";
import { initRun } from "./run.js";

function initTabs() {
  const tabs = document.querySelectorAll(".tab");
  for (const tab of tabs) {
    tab.addEventListener("click", () => {
      for (const other of tabs) {
        const selected = other === tab;
        other.setAttribute("aria-selected", String(selected));
        document.getElementById(other.dataset.tab).hidden = !selected;
      }
    });
  }
}

function initKey(onChange) {
  const field = document.getElementById("api-key");
  field.value = apiKey();
  field.addEventListener("change", () => {
    setApiKey(field.value.trim());
    onChange();
  });
}

initTabs();
const chat = initChat();
initRun();
initKey(() => chat.loadModels());
