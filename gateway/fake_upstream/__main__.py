from gateway.fake_upstream.cli import main

main()
