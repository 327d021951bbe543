"""``python -m icl_course.course timings PROFILE [CHAPTER_STEM ...]``: see :mod:`icl_course.course.book`;
``python -m icl_course.course device-check --out LOGDIR``: see :mod:`icl_course.course.device_check`."""

from icl_course.course.book import main

main()
