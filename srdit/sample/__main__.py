import sys

from srdit.sample.main import main

sys.exit(main())
