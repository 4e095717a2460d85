// Copy buttons of the key pages. Without this script (or a clipboard) the buttons stay
// hidden and the key is selected with one click instead.
(function () {
  "use strict";
  if (!navigator.clipboard || !window.isSecureContext) {
    return;
  }
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) {
      return;
    }
    var label = button.textContent;
    button.hidden = false;
    button.addEventListener("click", function () {
      navigator.clipboard.writeText(source.textContent.trim()).then(
        function () {
          button.textContent = "Copied";
          button.classList.add("done");
        },
        function () {
          button.textContent = "Select the key to copy it";
        }
      );
      setTimeout(function () {
        button.textContent = label;
        button.classList.remove("done");
      }, 2500);
    });
  });
})();
