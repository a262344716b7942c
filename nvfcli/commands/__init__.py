"""One module per command: parse options, build the stage Config, call the stage."""
