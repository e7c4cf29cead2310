from langchain_adaptquant.cli.main import main

raise SystemExit(main())
