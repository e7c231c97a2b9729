from portal_backoffice.launcher import main

raise SystemExit(main())
