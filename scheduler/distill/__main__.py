import sys

from scheduler.distill.command import main

sys.exit(main())
