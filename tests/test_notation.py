"""notation.md covers every chapter: each chapter's symbols have a row under a section for that chapter.

A section is a ``## `` heading of notation.md that names its chapters ("Chapter 5: ...", or
"Chapters 1-4: ..." for symbols they share). A symbol counts as defined for chapter N when a table row
of a section that covers N starts with it, written exactly as below.
"""

import re

from icl_course import topics
from icl_course.course.book import ROOT

# per chapter, the symbols it uses, as notation.md writes them in a row's first cell
SYMBOLS = {
    1: [r"$d$", r"$n$", r"$x_q,\ y_q$", r"$Q = W_K^\top W_Q,\ P = W_P W_V$", r"$\hat y_q = -Z_{n+1, d+1}$", r"$\eta$",
        r"$\partial \hat y_q / \partial x_q$", r"$w_1 = \frac{\eta}{n}\sum_i y_i x_i$", r"$\alpha$", r"$s$ (input scale)",
        r"$\gamma' = \gamma / n$"],
    2: [r"$\Sigma$", r"$\Gamma$", r"$S = \frac1n X^\top X$", r"$h = \frac1n X^\top y$", r"$\Gamma^* = A^{-1}$",
        r"$-(P_{yy}Q_{xx} + Q_{xy}P_{yx})$", r"$w_\ell$", r"$w_{LS} = (X^\top X)^{-1}X^\top y$"],
    3: [r"$\sigma$", r"$\sigma_\tau$", r"$\lambda$", r"$\hat\sigma^2$", r"$q_x, q_y, p_x, p_y$",
        r"$w_{xx}, w_{xy}, w_{yx}, w_{yy}$", r"$\Sigma = \frac1n X^\top X$",
        r"$g = \frac1n X^\top r$, $\rho = \frac1n\lVert r\rVert^2$", r"$\beta$"],
    4: [r"$A$, $X_k$", r"$R_k = I - AX_k$", r"$\kappa$", r"$M_k$", r"$p$", r"$z = (x, u, e, y)$",
        r"$N,\ T = \frac1N\sum_j c_j c_j^\top$", r"$\mu$", r"$\sigma(\cdot)$"],
    5: [r"$x_1, \dots, x_T$", r"$W_t$, $W_0$", r"$K, V, Q$", r"$\ell_t(W)$",
        r"$\eta_t = \eta_{\text{base}}\,\sigma(\theta_{\text{lr}} \cdot x_t)/f$", r"$b$", r"$\beta_t$",
        r"$\kappa(q, k) = e^{q\cdot k}$"],
    6: [r"$n$", r"$T(n)$", r"$T$", r"$e = \mathrm{Embed}(\text{prompt})$, $h_t$",
        r"$c_t = \frac1L\sum_\ell \max_v \log p_t(v \mid \ell)$", r"$K$, $k$",
        r"$m_t = \mathrm{logit}(1) - \mathrm{logit}(0)$"],
    7: [r"$g_t$", r"$m_t, v_t$", r"$\beta_1, \beta_2$, $\epsilon$", r"$\mu = \lVert\mu\rVert e_1$", r"$s$", r"$\sigma_p$",
        r"$\mathrm{SNR} = \lVert\mu\rVert/(\sigma_p\sqrt s)$", r"$n$"],
}

# letters that change meaning, and chapters whose meaning their row must name
COLLISIONS = {r"$n$": (1, 6, 7), r"$Q$": (1, 5), r"$\sigma$": (3, 4, 5, 7), r"$T$": (4, 5, 6), r"$s$": (1, 4, 7),
              r"$\Sigma$": (2, 3)}


def sections(text: str) -> list[tuple[str, str]]:
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def chapters_of(heading: str) -> set[int]:
    match = re.match(r"Chapters? (\d+)(?:-(\d+))?\b", heading)
    if not match:
        return set()
    first = int(match.group(1))
    return set(range(first, int(match.group(2) or first) + 1))


def first_cells(body: str) -> set[str]:
    return {line.split(" | ")[0].removeprefix("| ").strip() for line in body.splitlines() if line.startswith("| ")}


def test_every_chapter_has_a_section_and_its_symbols_are_defined_there():
    text = (ROOT / "notation.md").read_text()
    assert sorted(SYMBOLS) == [t.number for t in topics.TOPICS]
    for number, symbols in SYMBOLS.items():
        covering = [(h, b) for h, b in sections(text) if number in chapters_of(h)]
        own = [h for h, _ in covering if chapters_of(h) == {number}]
        assert own, f"notation.md has no section '## Chapter {number}: ...'"
        defined = set().union(*(first_cells(b) for _, b in covering))
        missing = [s for s in symbols if s not in defined]
        assert not missing, f"chapter {number}'s symbols {missing} have no row under {[h for h, _ in covering]}"


def test_letters_that_change_meaning_say_where_each_meaning_holds():
    text = (ROOT / "notation.md").read_text()
    (body,) = [b for h, b in sections(text) if h.startswith("Symbols that mean different things")]
    rows = {line.split(" | ")[0].removeprefix("| ").strip(): line for line in body.splitlines() if line.startswith("| ")}
    for letter, chapters in COLLISIONS.items():
        assert letter in rows, f"no row for {letter}"
        for number in chapters:
            said = re.findall(r"ch\. (\d+)(?:-(\d+))?", rows[letter])
            named = set().union(*(range(int(a), int(b or a) + 1) for a, b in said))
            assert number in named, f"the row of {letter} does not say what it means in chapter {number}"
