"""Click subcommands, one module each; they parse options, call the API and print."""
