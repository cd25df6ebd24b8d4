//! The README's library example works from any directory, as it does in a program outside this
//! repository (the doctest of the README compiles it; this runs it from a directory that is not
//! the repository). Its own test binary: the working directory is process-wide.

use step3::{GenerateOptions, Message, Step3};

#[test]
fn the_readme_example_runs_outside_the_repository() {
    let elsewhere = tempfile::tempdir().unwrap();
    std::env::set_current_dir(elsewhere.path()).unwrap();
    let model = Step3::from_dir(step3::demo::demo_dir()).build().unwrap();
    let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
    let reply = model.generate(&[Message::user("Hello!")], &opts).unwrap();
    assert!(!reply.tokens.is_empty());
    // The default dtype on the CPU is f32 (the fastest exact one there).
    assert_eq!(model.model().text.dtype(), step3::DType::F32);
    // A relative path that does not exist here is a missing directory, never a hub request.
    let err = Step3::from_pretrained("./demo/step3-demo").build().unwrap_err().to_string();
    assert_eq!(err, "no such model directory: ./demo/step3-demo");
}
