import sys

from gui.preload import start_preloading

start_preloading()  # before Qt is even imported

from gui.app import main  # noqa: E402

sys.exit(main())
