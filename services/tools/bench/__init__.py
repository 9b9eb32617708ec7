"""`ditserve bench ...`: each module here exposes add_arguments(parser) and run(args) -> dict."""
