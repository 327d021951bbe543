"""``python -m icl_course.course timings PROFILE [CHAPTER_STEM ...]``: see :mod:`icl_course.course.book`."""

from icl_course.course.book import main

main()
