from minisd.cli import main

raise SystemExit(main())
