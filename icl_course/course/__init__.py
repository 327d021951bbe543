"""The course's tooling, not its mathematics: the command line (``cli``), notebook handling
(``notebooks``: student versions, headers), sandboxed grading (``grading``) and what the landing page
shows (``book``: chapter tables, syllabus, run times)."""
