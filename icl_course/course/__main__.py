"""``python -m icl_course.course timings PROFILE [CHAPTER_STEM ...]``: see :mod:`icl_course.course.book`;
``python -m icl_course.course device-check --out LOGDIR``: see :mod:`icl_course.course.device_check`."""

import sys

if len(sys.argv) >= 2 and sys.argv[1] == "device-check":
    from icl_course.course.device_check import main as device_check

    raise SystemExit(device_check(sys.argv[2:]))

from icl_course.course.book import main  # noqa: E402

main()
